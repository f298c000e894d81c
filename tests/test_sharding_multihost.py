"""Two processes on 127.0.0.1 (2 CPU devices each) train like one process with 4 devices.

The step's gradient, with 1, 2 and 4 micro-batches, is checked against the unsharded reference as in
test_sharding.py, and the parameters after two Adam steps against the single process's.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np

from tests.helpers import WORKER, assert_gradients_match, assert_same_params, load, run_worker


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_process_with_the_same_devices(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    out = tmp_path / "two.npz"
    workers = [
        subprocess.Popen([sys.executable, str(WORKER), str(out), "--devices", "2", "--coordinator", coordinator,
                          "--processes", "2", "--process-id", str(index)])
        for index in range(2)
    ]
    try:
        assert [worker.wait(timeout=300) for worker in workers] == [0, 0]
    finally:
        for worker in workers:
            worker.kill()
    run_worker(tmp_path / "one.npz", "--devices", "4")
    first, second, single = load(tmp_path / "two.0.npz"), load(tmp_path / "two.1.npz"), load(tmp_path / "one.npz")
    trained = {name: value for name, value in single.items() if "/reference" not in name}  # what both runs save
    for name in trained:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert_same_params(first, trained, atol=1e-5)
    assert_gradients_match(first, 4, single)  # both runs use every device: 'mesh4/...'
