"""experiments/bench_accelerator.py: its --smoke run on CPU writes a well-formed report.

The run happens in a child process in which orbax, ml_collections, matplotlib,
tensorflow(-datasets), grain, torch and singd cannot be imported, as on an
accelerator machine that has only jax, flax, optax and numpy.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import bench_accelerator

REPO = Path(__file__).resolve().parents[1]
ABSENT = ("orbax", "orbax.checkpoint", "ml_collections", "matplotlib", "tensorflow",
          "tensorflow_datasets", "grain", "torch", "singd")
# fields every measured row fills with a positive number
MEASURED = {"optimizers": ("ours_ms", "baseline_ms", "ratio", "ours_floor_ms",
                           "ours_over_floor", "baseline_floor_ms", "compile_s"),
            "singd": ("ours_ms", "sgd_ms", "adamw_ms", "ours_over_sgd", "precond_kib",
                      "step_mib", "sgd_step_mib", "compile_s"),
            "train": ("sing_images_s", "adamw_images_s", "sing_over_adamw", "compile_s")}


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator") / "report.md"
    script = REPO / "experiments" / "bench_accelerator.py"
    # run as `python experiments/bench_accelerator.py ...` would, with the modules absent
    code = ("import runpy, sys\n"
            f"for name in {ABSENT!r}:\n"
            "    sys.modules[name] = None\n"
            f"sys.path.insert(0, {str(script.parent)!r})\n"
            f"sys.argv = [{str(script)!r}, '--smoke', '--out', {str(out)!r}]\n"
            f"runpy.run_path({str(script)!r}, run_name='__main__')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.with_suffix(".json").read_text()), out.read_text()


def test_smoke_report_has_every_section_with_complete_rows(smoke_report):
    report, _ = smoke_report
    assert report["meta"]["plan"] == "smoke" and report["meta"]["platform"] == "cpu"
    assert report["meta"]["copy_bandwidth_gb_s"] > 0
    assert list(report["sections"]) == list(bench_accelerator.SECTIONS)
    for name, section in report["sections"].items():
        assert section["rows"], f"section {name} has no rows"
        assert "target" in section["columns"]
        for row in section["rows"]:
            assert set(section["columns"]) <= set(row), (name, row)
            assert row["status"] == "ok", (name, row)  # the smoke run fits its budget
            for field in MEASURED[name]:
                assert row[field] > 0 and math.isfinite(row[field]), (name, field, row)


def test_smoke_report_checks_every_target_and_skips_pytorch_with_a_reason(smoke_report):
    report, _ = smoke_report
    targets = report["targets"]
    assert {t["target"] for t in targets} == {t.text for t in bench_accelerator.TARGETS}
    for t in targets:
        assert t["status"] in ("met", "not met", "not measured"), t
        if t["value"] is not None:  # the verdict agrees with the number
            bound = float(t["bound"].split()[1])
            within = t["value"] <= bound if t["bound"].startswith("<=") else t["value"] >= bound
            assert t["status"] == ("met" if within else "not met"), t
    torch_target = next(t for t in targets if "PyTorch" in t["target"])
    assert torch_target["status"] == "not measured"
    for row in report["sections"]["train"]["rows"]:
        assert row["torch_adamw_images_s"] is None and "not on a GPU" in row["note"]
    rows_with_targets = [row for section in report["sections"].values()
                         for row in section["rows"] if row["target"] != "-"]
    assert rows_with_targets and all(
        row["target"] == "met" or "not" in row["target"] for row in rows_with_targets)


def test_smoke_markdown_has_the_targets_and_one_table_line_per_row(smoke_report):
    report, text = smoke_report
    assert "## Targets" in text and "target checks met" in text
    blocks = text.split("\n## ")
    for section in report["sections"].values():
        block = next(b for b in blocks if b.startswith(section["title"]))
        table = [line for line in block.splitlines() if line.startswith("|")]
        header = [cell.strip() for cell in table[0].strip("|").split("|")]
        assert "target" in header and "status" in header
        assert len(table) - 2 == len(section["rows"])  # header, rule, one line per row
        for line in table[2:]:
            assert len(line.strip("|").split("|")) == len(header)


def test_the_pytorch_windows_take_their_steps_on_the_device_they_are_given(monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("singd")
    from experiments import bench_singd, bench_train

    calls = []
    real_step = bench_singd.torch_step

    def counted_step(*args, **kwargs):
        one = real_step(*args, **kwargs)
        calls.append(kwargs["device"])
        return lambda: (calls.append("step"), one())[1]

    monkeypatch.setattr(bench_singd, "torch_step", counted_step)
    window, steps = bench_accelerator.torch_singd_window("mlp", "diagonal", batch=4, steps=3,
                                                         device="cpu")
    assert calls[0] == "cpu" and steps == 3  # a step under a second: whole windows
    before = len(calls)
    window()
    assert calls[before:] == ["step"] * steps

    model = bench_train.torch_resnet18(width=4)
    start = [p.detach().clone() for p in model.parameters()]
    window, steps = bench_accelerator.torch_train_window(lambda: model, 2, "bfloat16",
                                                         window_s=0.0, device="cpu")
    assert steps == bench_accelerator.LOOKAHEAD_EVERY  # whole Lookahead cycles
    after_warmup = [p.detach().clone() for p in model.parameters()]
    window()
    for first, warm, now in zip(start, after_warmup, model.parameters()):
        assert not torch.equal(first, warm) and not torch.equal(warm, now)


def test_the_full_plan_names_only_pieces_that_exist_at_the_sizes_it_claims():
    from flax import nnx

    from experiments import bench_optimizers, bench_singd
    from sing_jax.nn import models

    plan = bench_accelerator.FULL
    known = {pair[0] for pair in bench_optimizers.optimizer_pairs()}
    assert set(plan.optimizers) == known  # every pair of bench_optimizers
    assert [label for label, *_ in plan.trees] == ["ResNet-18 (CIFAR)", "ViT-B/16"]
    # the rows with targets come first, then every structure at T=1 and T=10 on both models
    assert plan.singd_rows[:2] == (("cnn", "diagonal", 10), ("cnn", "dense", 1))
    assert {(m, s, t) for m in ("mlp", "cnn") for s in bench_singd.STRUCTURES
            for t in (1, 10)} <= set(plan.singd_rows)
    assert len(set(plan.singd_rows)) == len(plan.singd_rows)
    vit_tiny = nnx.eval_shape(lambda: models.ViT(**plan.vit_tiny, rngs=nnx.Rngs(0)))
    assert 5.5e6 < models.count_params(vit_tiny) < 6.0e6  # ViT-Ti/16, 1000 classes: 5.7M
    assert plan.train_rows[0] == ("ResNet-18", 128, "float32")
    assert {(m, b, d) for m in ("ResNet-20", "ResNet-18") for b in (128, 512)
            for d in ("float32", "bfloat16")} == set(plan.train_rows)
    for build_jax, build_torch, _ in plan.train_models.values():
        assert callable(build_jax) and callable(build_torch)
