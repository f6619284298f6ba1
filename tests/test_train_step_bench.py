"""benchmarks/train_step.py: its rows run with the threads they say, and its phase table times the
trainer's own methods from outside without changing what they return."""

import argparse
import os
import statistics
import time
from unittest import mock

import pytest
import torch

from ifc_ds.dist import set_cpu_threads
from tests._benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("train_step")


def test_a_single_rank_keeps_the_threads_the_table_names(bench):
    """The worker used to set one thread, then init_distributed gave a lone rank both cores: a '1 rank x 1
    thread' table measured 2 threads. Under the worker's environment the rank keeps ``--threads``."""
    before = torch.get_num_threads()
    env = bench.rank_environment(0, 1, 12345, threads=1)
    try:
        with mock.patch.dict(os.environ, env), mock.patch("os.sched_getaffinity", return_value={0, 1, 2, 3}):
            torch.set_num_threads(1)
            set_cpu_threads()
            assert torch.get_num_threads() == 1
            os.environ.pop("OMP_NUM_THREADS")  # what the worker's environment lacked before
            set_cpu_threads()
            assert torch.get_num_threads() == 4  # one rank on a 4-core node: every core
    finally:
        torch.set_num_threads(before)


def test_train_py_runs_with_the_benchmark_ranks_and_threads(bench):
    """train.py's row used to start 2 ranks and divide by 2 whatever --ranks said."""
    args = argparse.Namespace(cifar="c.parquet", instances=100, batch=8, e2e_steps=3, model="resnet18", ranks=1,
                              threads=3)
    cmd, env = bench.train_command(args, "/tmp/out")
    assert cmd[cmd.index("--num_gpus") + 1] == "1"
    assert env["OMP_NUM_THREADS"] == "3"
    assert "output_dir=/tmp/out" in cmd and "data.limit=100" in cmd


class _Engine:
    def forward(self, x):
        time.sleep(0.02)
        return x + 1

    def step(self):
        time.sleep(0.01)


def test_phase_clock_times_wrapped_methods_only_inside_timing(bench):
    clock, engine = bench.PhaseClock(), _Engine()
    clock.wrap(engine, "forward", "fwd")
    clock.wrap(engine, "step", "step")
    assert engine.forward(1) == 2  # untimed: nothing recorded, the result unchanged
    assert clock.rows == {}
    with clock.timing("row"):
        assert engine.forward(1) == 2
        engine.forward(2)
        engine.step()
        time.sleep(0.03)  # outside every phase: "the rest"
    (step,) = clock.rows["row"]
    assert 0.04 <= step["fwd"] < 1.0  # two calls add up (upper bounds loose: a busy CI machine)
    assert 0.01 <= step["step"] < 1.0
    assert step[bench.TOTAL] >= step["fwd"] + step["step"] + 0.03
    medians = bench._phase_medians(clock.rows["row"])
    rest = step[bench.TOTAL] - step["fwd"] - step["step"]
    assert medians[bench.REST] == pytest.approx(1e3 * rest)
    assert medians[bench.DATA] == 0.0  # a phase the step never ran


def test_phase_clock_records_a_step_that_raised(bench):
    clock, engine = bench.PhaseClock(), _Engine()
    clock.wrap(engine, "forward", "fwd")
    with pytest.raises(TypeError), clock.timing("row"):
        engine.forward(None)
    assert clock.active is None and "fwd" in clock.rows["row"][0]


def test_per_round_ratio_compares_steps_of_one_round(bench):
    """Rounds 0-2 ran on a fast host, 3-6 on one 1.5x as slow; within a round the encoder alone took
    100 ms per 125 ms of the fed step (images/s ratio 0.8), except in round 3, where the fed step ran
    at the fast speed. The encoder alone's median is a slow round's, the fed step's a fast round's:
    their ratio reads 1.2, the fed step faster than the encoder alone. Within a round it is 0.8."""
    alone = [0.100, 0.100, 0.100, 0.150, 0.150, 0.150, 0.150]
    fed = [0.125, 0.125, 0.125, 0.125, 0.1875, 0.1875, 0.1875]
    assert statistics.median(alone) / statistics.median(fed) == pytest.approx(1.2)
    assert bench._per_round(alone, fed) == pytest.approx(0.8)
