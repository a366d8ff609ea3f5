"""PES over several processes (JAX's distributed runtime, gloo collectives on CPU) gives the
one-process meta-gradient, and a multi-process meta-training records and writes once.

Every process is a fresh interpreter joined through a coordinator on 127.0.0.1.
"""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).parent

SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    role, port, out, local_devices = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if role != "single":
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=int(role))
    from lagg_pipeline.aggregators.learned import LearnedAggregator
    from lagg_pipeline.meta.devices import host_copy, particle_devices, particle_sharding
    from lagg_pipeline.meta.pes import PES
    from test_pes import DATA, linear_task

    assert jax.local_device_count() == local_devices
    aggregator = LearnedAggregator("lagg_a", num_grads=2, hidden_size=8)
    theta = aggregator.init_meta_params(jax.random.PRNGKey(0))
    pes = PES(linear_task(), aggregator, num_tasks=4, trunc_length=6, pes_std=0.01, min_length=3, max_length=8,
              num_grads=2, num_local_steps=2, local_batch_size=8, local_learning_rate=0.3,
              particle_sharding=particle_sharding(particle_devices(None, 4)))
    state = pes.init(theta, jax.random.PRNGKey(1), DATA)
    estimate = jax.jit(pes.estimate)
    for k in range(2):  # two truncations, with resets (episodes of 3..8 rounds)
        grad, state, metrics = estimate(theta, state, jax.random.PRNGKey(2 + k), DATA)
    leaf = jax.tree.leaves(state.rounds.params)[0]
    assert len(leaf.sharding.device_set) == jax.device_count(), leaf.sharding
    grad, rounds, metrics = host_copy((grad, state.rounds, metrics))  # a collective across processes
    if jax.process_index() == 0:
        np.savez(out, *jax.tree.leaves(grad), *jax.tree.leaves(rounds), resets=metrics["episode_resets"])
    print("ok", jax.process_count(), jax.device_count())
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args, local_devices: int = 1, stdout=subprocess.PIPE, **popen):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(TESTS),
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices}"}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=stdout, stderr=subprocess.STDOUT,
                            text=True, **popen)


def finish(processes, timeout=600) -> list[str]:
    outputs = []
    for p in processes:
        out, _ = p.communicate(timeout=timeout)
        outputs.append(out)
        assert p.returncode == 0, out[-3000:]
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("local_devices", [1, 2])
def test_two_processes_give_the_one_process_meta_gradient(local_devices, tmp_path):
    port = free_port()
    single = finish([spawn(["-c", SCRIPT, "single", "0", str(tmp_path / "single.npz"), "1"])])[0]
    assert single.strip().endswith("ok 1 1")
    outputs = finish([spawn(["-c", SCRIPT, str(pid), str(port), str(tmp_path / "multi.npz"), str(local_devices)],
                            local_devices) for pid in (0, 1)])
    assert all(out.strip().endswith(f"ok 2 {2 * local_devices}") for out in outputs), outputs
    one, two = np.load(tmp_path / "single.npz"), np.load(tmp_path / "multi.npz")
    assert float(one["resets"]) > 0
    assert one.files == two.files
    for name in one.files:  # the meta-gradient, then every member's weights and optimizer state
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_two_process_meta_training_from_the_command_line_matches_one_process():
    from test_e2e import TINY_META, cli, mlflow_runs

    args = ["optimizer=lopt_a", "mode=meta_train", *TINY_META, "progress=false"]  # 2*num_tasks = 4 particles
    cli(*args, "checkpoint_dir=single")
    port = free_port()
    outputs = finish([spawn(["-m", "lagg_pipeline", *args, "checkpoint_dir=multi", "distributed.enabled=true",
                             f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                             f"distributed.process_id={pid}"]) for pid in (0, 1)])
    assert "process 1 of 2: 1 local, 2 devices in all" in outputs[1]
    assert "meta-parameters:" in outputs[0] and "meta-parameters:" not in outputs[1]  # process 0 exports
    (single_dir,), (multi_dir,) = ([p for p in Path(d).iterdir() if p.is_dir()] for d in ("single", "multi"))
    assert single_dir.name == multi_dir.name  # the same meta-training: either resumes the other's checkpoints
    assert sorted(p.name for p in multi_dir.glob("ckpt_*.npz")) == ["ckpt_00000002.npz", "ckpt_00000004.npz"]
    one, two = np.load(single_dir / "meta_params.npz"), np.load(multi_dir / "meta_params.npz")
    assert set(one.files) == set(two.files)
    # AdamW's first steps are nearly sign(g) * lr (lr 1e-3 here): a reduction-order difference in
    # a near-zero gradient component moves that parameter by ~1e-6; a wrong gradient, by ~lr.
    for name in one.files:
        if name != "__metadata__":
            np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
    runs = [r for r in mlflow_runs() if r.data.tags.get("meta_run") == multi_dir.name]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # one per meta-training, none per follower
    from mlflow.tracking import MlflowClient

    histories = [[m.value for m in sorted(MlflowClient().get_metric_history(r.info.run_id, "meta_loss"),
                                          key=lambda m: m.step)] for r in runs]
    assert len(histories[0]) == 4
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-5)  # the same meta-losses, step by step



@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_checkpoint_and_resumes_bit_for_bit():
    """SIGTERM reaches process 1 only: both agree on it at the same outer step, process 0 writes
    one checkpoint there and ends its run KILLED, both exit 143 (no hang in a lone gather), and
    resume=true finishes bit for bit like an uninterrupted two-process meta-training."""
    import signal
    import time

    from test_e2e import TINY_META, mlflow_runs

    args = ["optimizer=lopt_a", "mode=meta_train", *TINY_META, "num_outer_steps=40", "save_iter=3", "progress=false"]

    def two_processes(checkpoint_dir, *extra):
        """Both processes' output goes to files: a full pipe would stall one inside a collective."""
        port = free_port()
        return [spawn(["-m", "lagg_pipeline", *args, f"checkpoint_dir={checkpoint_dir}", "distributed.enabled=true",
                       f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                       f"distributed.process_id={pid}", *extra], stdout=open(f"{checkpoint_dir}{pid}.log", "w"))
                for pid in (0, 1)]

    def outputs_of(processes, checkpoint_dir):
        for p in processes:
            p.wait(timeout=600)
        texts = [Path(f"{checkpoint_dir}{pid}.log").read_text() for pid in (0, 1)]
        print(*texts, sep="\n----\n")  # shown when the test fails
        return texts

    from lagg_pipeline.data import load_splits

    load_splits("digits")  # prepared once here: two processes preparing it at once would race
    processes = two_processes("termed")
    try:
        deadline = time.time() + 600
        while not list(Path("termed").rglob("ckpt_00000003.npz")) and time.time() < deadline:
            assert all(p.poll() is None for p in processes), outputs_of(processes, "termed")
            time.sleep(0.2)
        processes[1].send_signal(signal.SIGTERM)
        outputs = outputs_of(processes, "termed")
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [143, 143], [out[-3000:] for out in outputs]
    (run_dir,) = [p for p in Path("termed").iterdir() if p.is_dir()]
    steps = sorted(int(p.stem.split("_")[1]) for p in run_dir.glob("ckpt_*.npz"))
    stopped = steps[-1]
    assert stopped < 40 and all(s % 3 == 0 for s in steps[:-1])
    assert all(f"SIGTERM at outer step {stopped}" in out for out in outputs), outputs
    (run,) = mlflow_runs()
    assert run.info.status == "KILLED"
    resumed = two_processes("termed", "resume=true")
    assert f"resuming {run_dir.name} at outer step {stopped}" in outputs_of(resumed, "termed")[0]
    uninterrupted = two_processes("straight")
    outputs_of(uninterrupted, "straight")
    assert [p.returncode for p in resumed + uninterrupted] == [0, 0, 0, 0]
    (straight,) = [p for p in Path("straight").iterdir() if p.is_dir()]
    a, b = np.load(straight / "meta_params.npz"), np.load(run_dir / "meta_params.npz")
    for name in a.files:
        if name != "__metadata__":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert sorted(r.info.status for r in mlflow_runs()) == ["FINISHED", "FINISHED"]
