"""The Ray executor: the decode and the shared pass on Ray Data give the local executor's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from auditkit.check import Check, CheckParams, CheckResult, Metric, Needs
from auditkit.cli import main
from auditkit.demo import prepare_demo
from auditkit.executors import ExecutorError, check_exactly_once
from auditkit.spec import ExecutorSpec

CHECKS = "calibration,bias,performance,leakage,phi,corruption"  # corruption asks for a GPU where there is one


def _metrics(results: dict[str, Any]) -> dict[tuple[str, str, str], float | None]:
    return {
        (check["id"], m["name"], json.dumps(m.get("labels", {}), sort_keys=True)): m["value"]
        for check in results["checks"]
        for m in check.get("metrics", [])
    }


def _assert_same_metrics(local: dict[str, Any], ray: dict[str, Any]) -> None:
    a, b = _metrics(local), _metrics(ray)
    assert a.keys() == b.keys()
    for key, value in a.items():
        other = b[key]
        if value is None or other is None:
            assert value == other, key
        else:
            assert abs(value - other) <= 1e-6, (key, value, other)


def test_the_ray_executor_gives_the_local_results_each_row_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray")
    import auditkit.context
    import auditkit.data

    # Few headers kept and small chunks, so the PHI and leakage checks' header reads run as Ray
    # tasks by chunks (as a large study's do) and must still give the local results.
    monkeypatch.setattr(auditkit.data, "HEADERS_KEPT", 8)
    monkeypatch.setattr(auditkit.context, "HEADER_CHUNK", 8)
    spec = prepare_demo(tmp_path / "demo", n_patients=40, image_size=64)
    broken = sorted((tmp_path / "demo" / "study").rglob("*.dcm"))[3]
    broken.write_bytes(broken.read_bytes()[:200])  # undecodable: quarantined, exactly once
    runs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        code = main(["run", str(spec), "--only", CHECKS, "--no-pdf", "-q", "--out", str(out), "--executor", executor])
        assert code in (0, 1), executor
        runs[executor] = json.loads((out / "results.json").read_text())
    local, ray = runs["local"], runs["ray"]
    assert ray["run"]["executor"]["kind"] == "ray" and local["run"]["executor"] == {"kind": "local"}
    assert ray["run"]["executor"]["address"] == "local instance"
    # Every check ran as a Ray task with its declared resources; no GPU on this instance, so none asked.
    tasks = ray["run"]["executor"]["check_tasks"]
    assert sorted(tasks) == sorted(CHECKS.split(","))
    assert all(asked == {"num_cpus": 1.0, "num_gpus": 0.0} for asked in tasks.values())
    assert len(_metrics(local)) > 100
    _assert_same_metrics(local, ray)
    for check_l, check_r in zip(local["checks"], ray["checks"], strict=True):
        assert check_l["findings"] == check_r["findings"], check_l["id"]
    assert local["data"]["quarantine"] == ray["data"]["quarantine"]
    assert len(ray["data"]["quarantine"]) == 1
    # Exactly once: every decoded row forwarded once, the quarantined row neither.
    forwarded = ray["run"]["images_forwarded_per_split"]
    assert forwarded == local["run"]["images_forwarded_per_split"]
    assert forwarded["eval"] + forwarded["train"] == ray["run"]["images_decoded"] - 1
    assert local["verdict"] == ray["verdict"]


def test_exactly_once_names_the_missing_repeated_and_unknown_rows() -> None:
    order = check_exactly_once([2, 0, 1], 3, "decode")
    assert order.tolist() == [1, 2, 0]
    with pytest.raises(ExecutorError, match=r"missing \[1\], repeated \[2\], unknown \[7\]"):
        check_exactly_once([0, 2, 2, 7], 3, "shared pass eval")
    assert check_exactly_once(np.array([], dtype=np.int64), 0, "empty").size == 0


def test_an_unreachable_cluster_is_exit_2_naming_the_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("ray")
    spec = prepare_demo(tmp_path / "demo", n_patients=12, image_size=64)
    code = main(["run", str(spec), "--no-pdf", "-q", "--ray-address", "127.0.0.1:1"])
    assert code == 2
    assert "127.0.0.1:1 cannot be reached" in capsys.readouterr().err


def test_the_executor_spec_reads_a_kind_alone_and_refuses_an_address_without_ray(tmp_path: Path) -> None:
    assert ExecutorSpec.model_validate("ray").kind == "ray"
    assert ExecutorSpec.model_validate({"kind": "ray", "address": "auto"}).address == "auto"
    with pytest.raises(ValidationError, match="apply to kind: ray only"):
        ExecutorSpec.model_validate({"kind": "local", "address": "10.0.0.1:6379"})
    with pytest.raises(ValidationError, match=r"cluster at 10\.0\.0\.1:6379 has its own CPUs"):
        ExecutorSpec.model_validate({"kind": "ray", "address": "10.0.0.1:6379", "num_cpus": 4})
    spec = prepare_demo(tmp_path / "demo", n_patients=12, image_size=64)
    raw = yaml.safe_load(spec.read_text())
    raw["executor"] = {"kind": "spark"}
    spec.write_text(yaml.safe_dump(raw))
    assert main(["run", str(spec), "--no-pdf", "-q"]) == 2


def test_the_core_never_imports_ray() -> None:
    code = "import sys, auditkit.runner, auditkit.cli, auditkit.executors; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


DYING = '''
import os
from pathlib import Path

from auditkit.fixtures.models import tiny_cnn

MARK = Path(__file__).with_name("died-once")


def dying_cnn(**kwargs):
    """The demo's CNN, whose first forward call in a process other than the driver's ends it."""
    model = tiny_cnn(**kwargs)
    forward = model.forward

    def once_fatal(x):
        if os.getpid() != int(os.environ["AUDITKIT_TEST_DRIVER_PID"]) and not MARK.exists():
            MARK.write_text("a model actor died here")
            os._exit(1)
        return forward(x)

    model.forward = once_fatal
    return model
'''


def test_a_model_actor_killed_mid_pass_loses_and_doubles_no_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("ray")
    import os

    spec = prepare_demo(tmp_path / "demo", n_patients=24, image_size=64)
    (spec.parent / "dying.py").write_text(DYING)
    raw = yaml.safe_load(spec.read_text())
    raw["model"]["factory"] = "dying:dying_cnn"
    spec.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("AUDITKIT_TEST_DRIVER_PID", str(os.getpid()))
    runs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        code = main(
            ["run", str(spec), "--only", "calibration", "--no-pdf", "-q", "--out", str(out), "--executor", executor]
        )
        assert code in (0, 1), executor
        runs[executor] = json.loads((out / "results.json").read_text())
    assert (spec.parent / "died-once").is_file()  # an actor did die mid-pass, and was replaced
    _assert_same_metrics(runs["local"], runs["ray"])
    assert runs["ray"]["run"]["images_forwarded_per_split"] == runs["local"]["run"]["images_forwarded_per_split"]


class _Raises(Check[CheckParams]):
    """Planted: fails inside run(), as a buggy plug-in would."""

    id = "raises"
    family = "test"
    needs = Needs(predictions=True)

    def run(self, ctx: Any, params: CheckParams) -> CheckResult:
        ctx.predictions("eval")
        raise ValueError("a planted failure inside a check")


class _KillsWorker(Check[CheckParams]):
    """Planted: ends the process it runs in, unless that is the test's own (the driver)."""

    id = "kills_worker"
    family = "test"
    needs = Needs(predictions=True)

    def run(self, ctx: Any, params: CheckParams) -> CheckResult:
        if os.getpid() != DRIVER_PID:
            os._exit(1)
        raise RuntimeError("not in a worker")


DRIVER_PID = os.getpid()


def _reader(header: Any) -> tuple[int, str | None]:
    """Which process read a header, and its modality (module-level: it travels to Ray tasks)."""
    return os.getpid(), None if header is None else str(header.Modality)


class _HeaderReaders(Check[CheckParams]):
    """Planted: counts the eval headers read in another process than the check's own."""

    id = "header_readers"
    family = "test"
    needs = Needs(headers=True)
    emits = ("test.headers_read_elsewhere", "test.headers_read")

    def run(self, ctx: Any, params: CheckParams) -> CheckResult:
        read = list(ctx.map_headers("eval", _reader))
        elsewhere = sum(pid != os.getpid() for pid, _ in read)
        result = CheckResult()
        result.metrics.append(Metric("test.headers_read_elsewhere", float(elsewhere), "lower_is_better", n=len(read)))
        result.metrics.append(
            Metric("test.headers_read", float(sum(m is not None for _, m in read)), "higher_is_better", n=len(read))
        )
        return result


def _record(outcome: Any, check_id: str) -> dict[str, Any]:
    (record,) = [c for c in outcome.results["checks"] if c["id"] == check_id]
    return dict(record)


def _fails_on_a_header(header: Any) -> None:
    raise ValueError("a planted failure in a header function")


class _HeaderFunctionFails(Check[CheckParams]):
    """Planted: its per-header function raises wherever it runs."""

    id = "header_function_fails"
    family = "test"
    needs = Needs(headers=True, train=True)

    def run(self, ctx: Any, params: CheckParams) -> CheckResult:
        for _ in ctx.map_headers("train", _fails_on_a_header):
            pass
        return CheckResult()


def test_on_ray_a_checks_header_reads_run_in_ray_tasks_every_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")
    import auditkit.context
    import auditkit.data
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the planted check travels by value
    monkeypatch.setattr(auditkit.data, "HEADERS_KEPT", 3)
    monkeypatch.setattr(auditkit.context, "HEADER_CHUNK", 2)
    spec = load_spec(prepare_demo(tmp_path / "demo", n_patients=20, image_size=64)).model_copy(update={"checks": {}})
    values, errors = {}, {}
    for executor in ("local", "ray"):
        options = RunOptions(out_dir=tmp_path / executor, executor=executor, report=False)  # type: ignore[arg-type]
        # One check at a time: the header tasks run only where a CPU is free.
        check = _record(run_audit(spec, options, checks={"header_readers": _HeaderReaders}), "header_readers")
        assert check["status"] == "ok", check.get("error")
        values[executor] = {m["name"]: (m["value"], m["n"]) for m in check["metrics"]}
        monkeypatch.setattr(auditkit.data, "HEADERS_KEPT", 0)  # every header read from its file
        failing = run_audit(spec, options, checks={"header_function_fails": _HeaderFunctionFails})
        errors[executor] = _record(failing, "header_function_fails")["error"]
        monkeypatch.setattr(auditkit.data, "HEADERS_KEPT", 3)
    # A header function that raises in a Ray task: the check's error record names the same
    # exception as locally.
    assert errors["ray"]["type"] == errors["local"]["type"] == "ValueError"
    assert errors["ray"]["message"] == errors["local"]["message"] == "a planted failure in a header function"
    assert any("_in_chunk_order" in frame for frame in errors["ray"]["where"])  # raised from a header task
    assert not any("executors.py" in frame for frame in errors["local"]["where"])
    (elsewhere, n) = values["ray"]["test.headers_read_elsewhere"]
    assert n > 3 + 2 * 2  # several chunks beyond the kept headers
    # Locally every header is read in the check's process; on Ray all but the 3 kept ones in tasks.
    assert values["local"]["test.headers_read_elsewhere"] == (0.0, n)
    assert elsewhere == n - 3
    assert values["ray"]["test.headers_read"] == values["local"]["test.headers_read"] == (float(n), n)


def test_a_check_task_that_raises_or_dies_is_an_error_record_and_the_others_finish(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from auditkit.checks.calibration import CalibrationCheck
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the planted checks travel by value
    spec = load_spec(prepare_demo(tmp_path / "demo", n_patients=20, image_size=64)).model_copy(update={"checks": {}})
    checks: dict[str, Any] = {"calibration": CalibrationCheck, "raises": _Raises, "kills_worker": _KillsWorker}
    records = {}
    for executor in ("local", "ray"):
        options = RunOptions(out_dir=tmp_path / executor, executor=executor, report=False)  # type: ignore[arg-type]
        outcome = run_audit(spec, options, checks=checks)
        assert outcome.exit_code == 3  # a check errored
        records[executor] = {c["id"]: c for c in outcome.results["checks"]}
    local, remote = records["local"], records["ray"]
    # The same error record as locally: type, message and where it was raised.
    assert remote["raises"]["status"] == local["raises"]["status"] == "error"
    assert remote["raises"]["error"] == local["raises"]["error"]
    assert remote["raises"]["error"]["type"] == "ValueError"
    # A worker that died: an error record naming what Ray saw, and the other checks finished.
    died = remote["kills_worker"]
    assert died["status"] == "error" and died["metrics"] == []
    assert "Error" in died["error"]["type"] and died["error"]["message"]
    assert remote["calibration"]["status"] == "ok"
    _assert_same_metrics({"checks": [local["calibration"]]}, {"checks": [remote["calibration"]]})
    checkpoint = json.loads((tmp_path / "ray" / "checkpoints" / "kills_worker.json").read_text())
    assert checkpoint["record"]["status"] == "error"


def test_the_checks_that_backpropagate_or_pass_many_copies_ask_for_a_gpu() -> None:
    from auditkit.registry import discover

    checks, broken = discover()
    assert not broken
    wants_gpu = {cid for cid, cls in checks.items() if cls.resources.gpus > 0}
    assert wants_gpu == {"adversarial", "backdoor", "corruption", "ood"}
    assert all(cls.resources.cpus >= 1 for cls in checks.values())
    # Every check that backpropagates through the model is among them.
    assert {cid for cid, cls in checks.items() if cls.needs.gradients} <= wants_gpu


def test_pixels_on_disk_stay_there_the_actors_read_their_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    from auditkit.pixels import DiskPixels

    spec = prepare_demo(tmp_path / "demo", n_patients=24, image_size=64)
    runs = {}
    for executor, pixels in (("local", "memory"), ("ray", "disk")):
        if executor == "ray":  # the driver must not read a whole split back to send it to the actors

            def refuse(self: DiskPixels) -> Any:
                raise AssertionError("a whole split was read back into the driver")

            monkeypatch.setattr(DiskPixels, "numpy", refuse)
        out = tmp_path / executor
        argv = ["run", str(spec), "--only", "calibration,bias", "--no-pdf", "-q", "--out", str(out)]
        assert main([*argv, "--executor", executor, "--pixels", pixels]) in (0, 1)
        runs[executor] = json.loads((out / "results.json").read_text())
    assert runs["ray"]["run"]["pixels"]["place"] == "disk"
    _assert_same_metrics(runs["local"], runs["ray"])
    assert runs["ray"]["run"]["images_forwarded_per_split"] == runs["local"]["run"]["images_forwarded_per_split"]


def test_the_leakage_check_asks_for_a_gpu_only_where_its_search_outweighs_its_fingerprinting() -> None:
    from auditkit.checks.leakage import GPU_SEARCH_IMAGES, LeakageCheck

    small = LeakageCheck.resources_for({"eval": 500, "train": 2_000, "ood": 10**6})  # OOD sets are not searched
    assert (small.cpus, small.gpus) == (1.0, 0.0)
    large = LeakageCheck.resources_for(
        {"eval": GPU_SEARCH_IMAGES // 4, "train": GPU_SEARCH_IMAGES - GPU_SEARCH_IMAGES // 4}
    )
    assert (large.cpus, large.gpus) == (1.0, 1.0)
    # Every other check asks for what its class declares, whatever the study's size.
    from auditkit.registry import discover

    checks, _ = discover()
    for cid, cls in checks.items():
        if cid != "leakage":
            assert cls.resources_for({"eval": 10**7, "train": 10**7}) == cls.resources


def test_on_a_cluster_with_a_gpu_a_large_study_leakage_task_asks_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ray = pytest.importorskip("ray")
    import auditkit.checks.leakage as leakage
    from auditkit.runner import RunOptions, run_audit
    from auditkit.spec import load_spec

    # A cluster that reports one GPU (Ray's scheduler counts it; the worker's torch sees no CUDA
    # device and computes on the CPU), and a study counted as large.
    monkeypatch.setattr(leakage, "GPU_SEARCH_IMAGES", 10)
    spec = load_spec(prepare_demo(tmp_path / "demo", n_patients=16, image_size=64))
    options = RunOptions(out_dir=tmp_path / "ray", executor="ray", report=False, only=["leakage", "calibration"])  # type: ignore[arg-type]
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        outcome = run_audit(spec, options)
    finally:
        ray.shutdown()
    executor = outcome.results["run"]["executor"]
    assert executor["cluster_gpus"] == 1.0
    assert executor["check_tasks"]["leakage"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert executor["check_tasks"]["calibration"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    statuses = {c["id"]: c["status"] for c in outcome.results["checks"]}
    assert statuses["leakage"] == statuses["calibration"] == "ok"
