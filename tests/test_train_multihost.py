"""Two processes on localhost (jax.distributed on CPU) equal one process, same global batch."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from sing_jax.train.logging import read_metrics

COMPARED = ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "test_loss",
            "test_accuracy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(workdir, cpu_devices, extra=()):
    return [sys.executable, "-m", "experiments.train",
            "--config=experiments/configs/quickstart.py:digits,adamw,tiny",
            f"--workdir={workdir}", f"--cpu_devices={cpu_devices}",
            "--config.num_devices=0", "--config.batch_size=64",
            "--config.logging.tensorboard=False", "--config.logging.plot=False",
            "--config.logging.progress=False", *extra]


def _env():
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the device count comes from --cpu_devices
    return env


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    single = subprocess.run(_command(tmp_path / "one", 4), env=_env(), capture_output=True,
                            text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(
        _command(tmp_path / "two", 2, [f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}"]),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "4 device(s)" in outs[0][1] and "4 device(s)" in single.stderr
    one = [r for r in read_metrics(tmp_path / "one") if r["kind"] == "epoch"]
    two = [r for r in read_metrics(tmp_path / "two") if r["kind"] == "epoch"]
    assert len(one) == len(two) == 1
    for key in COMPARED:
        # Same global batch and 4 devices in both; only the cross-process reduction differs.
        np.testing.assert_allclose(two[0][key], one[0][key], rtol=1e-5, err_msg=key)
    assert one[0]["train_loss"] < 2.3  # it trained (chance level is ln 10 = 2.30)
