"""Slow end-to-end smoke tests: the command line as a user runs it, MLflow as they read it."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "original_lopt_a_k8.pickle"
TINY_BENCH = ["num_runs=2", "num_rounds=20", "eval_every=10", "progress=false"]
TINY_META = ["num_tasks=2", "trunc_length=5", "num_inner_steps=30", "truncation_schedule_min_length=10",
             "num_outer_steps=4", "schedule=constant", "save_iter=2"]


def cli(*args, python=sys.executable, check=True, cwd=None):
    result = subprocess.run([python, "-m", "lagg_pipeline", *args], capture_output=True, text=True,
                            cwd=cwd, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def mlflow_runs():
    import mlflow

    uri = f"sqlite:///{Path('outputs/mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=["lagg_pipeline"], output_format="list")


def test_benchmark_run_is_recorded_in_mlflow():
    out = cli("optimizer=fedavg", *TINY_BENCH)
    assert "fedavg" in out.stdout and "± " in out.stdout
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["optimizer"] == "fedavg" and tags["H"] == "4" and tags["K"] == "8" and tags["task"] == "digits_mlp"
    assert len(tags["git_commit"]) in (40, 7) or tags["git_commit"] == "unknown"
    assert params["num_local_steps"] == "4" and params["optimizer.name"] == "fedavg"
    for name in ("train_loss", "test_loss", "test_accuracy", "outer_valid_loss", "seconds_per_round"):
        assert name in metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 21))
    test_steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy"))
    assert test_steps == [0, 10, 20]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"hydra", "plots", "curves"} <= artifacts
    hydra_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "hydra")}
    assert {"config.yaml", "overrides.yaml"} <= hydra_files


def test_sweep_has_one_parent_and_a_child_per_job():
    cli("--multirun", "optimizer=fedavg,slowmo", "H=4,8", *TINY_BENCH)
    runs = mlflow_runs()
    parents = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert {(c.data.tags["optimizer"], c.data.tags["H"]) for c in children} == {
        ("fedavg", "4"), ("fedavg", "8"), ("slowmo", "4"), ("slowmo", "8")}
    assert all(r.info.status == "FINISHED" for r in runs)


def test_joblib_launcher_runs_a_sweep_in_parallel():
    cli("--multirun", "launcher=joblib", "optimizer=fedavg,sgd", *TINY_BENCH)
    assert len([r for r in mlflow_runs() if r.data.tags.get("mlflow.parentRunId")]) == 2


@pytest.mark.parametrize("variant", ["lagg_a", "lopt_a", "lagg", "lopt"])
def test_learned_aggregator_meta_trains_then_benchmarks_beside_fedavg(variant):
    out = cli(f"optimizer={variant}", *TINY_META, *TINY_BENCH)
    assert variant in out.stdout and "fedavg" in out.stdout
    runs = {r.data.tags["optimizer"]: r for r in mlflow_runs()}
    assert set(runs) == {variant, "fedavg"}
    learned = runs[variant].data.metrics
    assert {"meta_loss", "meta_grad_norm", "meta_learning_rate", "aggregator_step_size",
            "seconds_per_outer_step", "train_loss", "test_accuracy"} <= set(learned)
    exported = sorted(Path("outputs/runs").rglob("meta_params.npz"))
    assert exported
    # The exported file benchmarks on its own, from a path or from its MLflow artifact URI.
    again = cli("mode=benchmark", f"optimizer={variant}", f"checkpoint={exported[0]}", *TINY_BENCH)
    assert variant in again.stdout
    uri = f"runs:/{runs[variant].info.run_id}/meta_params/meta_params.npz"
    assert variant in cli("mode=benchmark", f"optimizer={variant}", f"checkpoint={uri}", *TINY_BENCH).stdout


def test_benchmark_uses_the_trained_settings_and_refuses_another_k():
    cli("optimizer=lagg_a", "mode=meta_train", "num_local_steps=2", "local_learning_rate=0.3", *TINY_META,
        "progress=false")
    exported = sorted(Path("outputs/runs").rglob("meta_params.npz"))[0]
    # Without H or gamma on the command line, the benchmark uses those it was trained with.
    out = cli("mode=benchmark", "optimizer=lagg_a", f"checkpoint={exported}", *TINY_BENCH)
    assert "num_local_steps=2, local_learning_rate=0.3" in out.stdout
    benchmarked = [r for r in mlflow_runs() if r.data.tags.get("mode") == "benchmark"]
    assert {r.data.tags["H"] for r in benchmarked} == {"2"}
    refused = cli("mode=benchmark", "optimizer=lagg_a", "num_grads=16", f"checkpoint={exported}", *TINY_BENCH,
                  check=False)
    assert refused.returncode == 2  # refused before any compute
    assert "trained for K=8" in refused.stderr and "Traceback" not in refused.stderr


def test_kill_during_meta_training_then_resume_equals_uninterrupted():
    args = ["optimizer=lopt_a", "mode=meta_train", *TINY_META, "num_outer_steps=12", "save_iter=3",
            "progress=false"]
    cli(*args, "checkpoint_dir=straight")
    # Killed between checkpoints 6 and 9: it stops itself while writing 9 (polling for checkpoint
    # 6 instead raced a loaded machine, which could finish all 12 steps before the kill).
    _kill_where_it_pauses(args, "killed", "ckpt_00000009.npz:mid_write")
    (run_dir,) = [p for p in Path("killed").iterdir() if p.is_dir()]
    assert (run_dir / "ckpt_00000006.npz").exists() and not (run_dir / "ckpt_00000009.npz").exists()
    out = cli(*args, "checkpoint_dir=killed", "resume=true")
    assert "resuming" in out.stdout
    (straight_dir,) = [p for p in Path("straight").iterdir() if p.is_dir()]
    a, b = np.load(straight_dir / "meta_params.npz"), np.load(run_dir / "meta_params.npz")
    assert set(a.files) == set(b.files)
    for name in a.files:
        if name != "__metadata__":
            np.testing.assert_array_equal(a[name], b[name])
    # Two MLflow runs, not three: the resumed run logs into the run it continues, whose
    # meta-loss history then covers every outer step exactly once.
    runs = [r for r in mlflow_runs() if r.data.tags.get("meta_run") == run_dir.name]
    assert len(runs) == 2
    from mlflow.tracking import MlflowClient

    steps = [sorted(m.step for m in MlflowClient().get_metric_history(r.info.run_id, "meta_loss")) for r in runs]
    assert steps == [list(range(1, 13))] * 2


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def _kill_where_it_pauses(args, folder: str, pause: str) -> None:
    """Start a meta-training that stops itself at ``pause`` ("<checkpoint file>:<moment>" of
    writing it), wait until it has, and SIGKILL it there."""
    import os

    from lagg_pipeline.checkpoint import PAUSE_ENV

    proc = subprocess.Popen([sys.executable, "-m", "lagg_pipeline", *args, f"checkpoint_dir={folder}"],
                            env={**os.environ, PAUSE_ENV: pause}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not _stopped(proc.pid):
        assert proc.poll() is None and time.time() < deadline, f"{pause}: never paused"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_inside_a_checkpoint_write_never_selects_the_partial_file():
    """SIGKILL at three moments of writing checkpoint 6 (data half-written, file complete but not
    renamed, renamed but `latest` not updated); each time resume=true ends bit-identical."""
    from lagg_pipeline.checkpoint import CheckpointManager

    args = ["optimizer=lopt_a", "mode=meta_train", *TINY_META, "num_outer_steps=9", "save_iter=3", "progress=false",
            "tracking=off"]
    cli(*args, "checkpoint_dir=straight")
    (straight,) = [p for p in Path("straight").iterdir() if p.is_dir()]
    expected = np.load(straight / "meta_params.npz")
    for moment in ("mid_write", "before_rename", "before_pointer"):
        folder = f"killed_{moment}"
        _kill_where_it_pauses(args, folder, f"ckpt_00000006.npz:{moment}")
        (run_dir,) = [p for p in Path(folder).iterdir() if p.is_dir()]
        manager = CheckpointManager(run_dir, keep=10)
        assert manager.latest_step() == 3, moment  # the pointer never names an unfinished file
        assert (run_dir / "ckpt_00000006.npz").exists() == (moment == "before_pointer")
        assert bool(list(run_dir.glob(".ckpt_00000006.npz.*.tmp"))) == (moment != "before_pointer")
        out = cli(*args, f"checkpoint_dir={folder}", "resume=true")
        # a renamed file is complete, whatever `latest` says: resume takes the newest valid one
        step = 6 if moment == "before_pointer" else 3
        assert f"resuming {run_dir.name} at outer step {step}" in out.stdout, out.stdout
        assert not list(run_dir.glob(".*.tmp"))  # the stray temporary file was cleaned up
        resumed = np.load(run_dir / "meta_params.npz")
        for name in expected.files:
            if name != "__metadata__":
                np.testing.assert_array_equal(expected[name], resumed[name], err_msg=moment)


@pytest.mark.skipif(not FIXTURE.exists(), reason="../shared/fixtures is not present")
def test_import_legacy_then_benchmark():
    out = cli("mode=import_legacy", f"legacy_path={FIXTURE}", "optimizer=lopt_a", "num_grads=8",
              "output_path=imported.npz")
    assert Path("imported.npz").exists() and "mode=benchmark" in out.stdout
    bench = cli("mode=benchmark", "optimizer=lopt_a", "checkpoint=imported.npz", *TINY_BENCH)
    assert "lopt_a" in bench.stdout
    refused = cli("mode=import_legacy", f"legacy_path={FIXTURE}", "optimizer=lagg_a", "num_grads=8",
                  "output_path=x.npz", check=False)
    assert refused.returncode == 2 and "width 39" in refused.stderr


def test_regular_install_runs_from_another_directory(tmp_path):
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # Reuse this environment's dependencies (not its editable install of the package).
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                    str(REPO)], check=True, cwd=tmp_path, timeout=600)
    where = subprocess.run([str(python), "-c", "import lagg_pipeline.conf as c; print(c.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert str(venv) in where, where  # the installed copy, not the repository
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = cli("optimizer=fedavg", *TINY_BENCH, python=str(python), cwd=elsewhere)
    assert "fedavg" in out.stdout and (elsewhere / "outputs" / "mlflow.db").exists()


@pytest.mark.parametrize("experiment", ["paper_fmnist", "paper_fmnist_baselines"])
def test_experiment_recipes_run_when_scaled_down(experiment):
    # The recipes need Fashion-MNIST; the smoke test keeps their settings but swaps in digits.
    optimizer = "lopt_a" if experiment == "paper_fmnist" else "slowmo"
    meta = [a for a in TINY_META if not a.startswith("schedule")]
    out = cli(f"experiment={experiment}", f"optimizer={optimizer}", "task=digits_mlp", *meta,
              "schedule.warmup_steps=2", *TINY_BENCH)
    assert optimizer in out.stdout


def _recipes(prefix):
    from lagg_pipeline.cli import config_groups

    return [name for name in config_groups()["experiment"] if name.startswith(prefix)]


def test_every_pretrain_recipe_meta_trains_when_scaled_down():
    """All pretrain_<name> recipes in one sweep, with tiny budgets; each export records its recipe."""
    recipes = _recipes("pretrain_")
    assert len(recipes) >= 4
    # tiny budgets (4 particle pairs: one per task of the widest family), but each recipe's own
    # episode lengths (they tell some recipes apart)
    cli("--multirun", f"experiment={','.join(recipes)}", "optimizer=lagg_a", "num_tasks=4", "trunc_length=3",
        "num_outer_steps=2", "save_iter=2", "schedule=constant")
    exported = {}
    for path in Path("outputs/multirun").rglob("meta_params.npz"):
        from lagg_pipeline.checkpoint import load_params

        metadata = load_params(path)[1]
        exported[metadata["command"].split("experiment=")[1].split()[0]] = metadata
    assert sorted(exported) == sorted(recipes)
    from importlib import resources

    from omegaconf import OmegaConf

    from lagg_pipeline import pretrained
    from lagg_pipeline.config import CONFIG_PACKAGE

    for recipe, metadata in exported.items():
        name = recipe[len("pretrain_"):]
        assert metadata["task"] == ("mnist1d_large_mlp" if name.startswith("mnist1d_large") else
                                    "mnist1d_mlp" if name.startswith("mnist1d") else "digits_mlp")
        assert f"_h{metadata['num_local_steps']}" in name and metadata["num_grads"] == 8
        families = {"family": ["digits_mlp", "mnist1d_mlp_small"],
                    "family4": ["digits_mlp", "mnist1d_mlp_small", "digits_mlp_wide", "mnist1d_mlp_shallow"]}
        family = name.split("_k8")[0] in families
        assert metadata.get("meta_tasks") == families.get(name.split("_k8")[0])
        resplit = family or name.endswith("_resplit") or name.startswith("mnist1d_large")
        assert metadata["meta_loss_split"] == ("resplit" if resplit else "outer_valid" if "_ov" in name else "train")
        weights = {"_mix": 0.5, "_mix75": 0.75}
        base = name.removesuffix("_cont")  # _cont: continues a shipped aggregator, the recipe's pretrained=
        assert metadata.get("meta_loss_train_weight") == weights.get(base[base.rfind("_"):]), name
        start = OmegaConf.create((resources.files(CONFIG_PACKAGE) / "experiment" / f"{recipe}.yaml").read_text()).get("pretrained")
        assert metadata.get("started_from") == (start if base != name else None)
        assert base == name or ("lagg_a", start) in pretrained.available()
        assert metadata["outer_steps"] == 2 and metadata["meta_train_seconds"] > 0
        assert metadata["partition"] == ("dirichlet(alpha=0.1, M=64)" if "dirichlet" in name else "iid")
        # names carry _avg for an averaging start, except the resplit ones (all start so) and on
        # MNIST-1D, where all but the _ov ones start so
        averaging = "_avg" in name or resplit or (name.startswith("mnist1d") and not name.endswith("_ov"))
        assert metadata["meta_init"] == ("saved" if base != name else "averaging" if averaging else "random"), name


def test_benchmark_over_heterogeneous_clients_is_recorded_and_reported():
    out = cli("optimizer=fedavg", "task=mnist1d_mlp", "partition=dirichlet", "partition.alpha=0.1",
              "tracking.experiment=results", *TINY_BENCH)
    assert "partition dirichlet(alpha=0.1, M=64): min_client_size=100, max_client_size=100" in out.stdout
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{Path('outputs/mlflow.db').resolve()}")
    (run,) = mlflow.search_runs(experiment_names=["results"], output_format="list")
    assert run.data.tags["partition"] == "dirichlet(alpha=0.1, M=64)"
    assert run.data.params["partition.name"] == "dirichlet" and run.data.params["partition.alpha"] == "0.1"
    assert run.info.run_name.endswith("dirichlet(alpha=0.1, M=64)")
    assert 0.3 < run.data.metrics["partition_mean_dominant_class_fraction"] < 1.0
    report = cli("mode=report", "tracking.experiment=results", "report_dir=rep")
    assert "mnist1d_mlp, K=8, H=4, B=128, clients: dirichlet(alpha=0.1, M=64): 20 rounds, 2 seeds" in report.stdout
    assert Path("rep/mnist1d_mlp_K8_H4_B128_R20_dirichlet_alpha0.1_M64.png").is_file()


def test_tune_select_apply_and_report(tmp_path):
    """A grid into the tuning experiment, the best point recorded, reused, and reported."""
    cli("--multirun", "hparams_search=fedavg", "H=4", "num_rounds=10", "num_runs=1", "eval_every=5")
    again = cli("--multirun", "hparams_search=fedavg", "H=4", "num_rounds=10", "num_runs=1", "eval_every=5")
    assert again.stdout.count("these settings finished in run ") == 5  # an interrupted grid continues where it was
    cli("mode=select_tuned", "tuned_dir=tuned")
    from omegaconf import OmegaConf

    entry = OmegaConf.to_container(OmegaConf.load("tuned/digits_mlp/fedavg.yaml"))["H4_K8"]
    assert entry["grid_points"] == 5 and entry["seeds"] == 1 and entry["rounds"] == 10
    assert entry["sweep"] == ["python -m lagg_pipeline --multirun hparams_search=fedavg H=4 num_rounds=10 "
                              "num_runs=1 eval_every=5"]
    best = entry["values"]["local_learning_rate"]
    out = cli("optimizer=fedavg", "tuned_dir=tuned", "tracking.experiment=results", *TINY_BENCH)
    assert f"tuned values for digits_mlp H=4 K=8 (conf/tuned_hparams; tuned=false turns them off): " \
           f"local_learning_rate={best}" in out.stdout
    cli("optimizer=fedadam", "tuned_dir=tuned", "tracking.experiment=results", *TINY_BENCH)
    Path("README.md").write_text("# x\n<!-- results:begin -->\n<!-- results:end -->\n")
    report = cli("mode=report", "tracking.experiment=results", "report_dir=rep", "readme=README.md")
    assert "### digits_mlp, K=8, H=4, B=128: 20 rounds, 2 seeds" in report.stdout
    # tuned at 10 rounds and judged over 20: the row says so
    assert f"| fedavg (tuned at 10 rounds) | local_learning_rate={best} |" in Path("rep/report.md").read_text()
    assert Path("rep/digits_mlp_K8_H4_B128_R20.png").exists()
    assert "(rep/digits_mlp_K8_H4_B128_R20.png)" in Path("README.md").read_text()
    Path("HEAD.md").write_text("# x\n<!-- headline:begin -->\n<!-- headline:end -->\n")
    cli("mode=report", "tracking.experiment=results", "readme=README.md", "headline=HEAD.md")
    from lagg_pipeline.report.headline import HEADER

    # no learned aggregator ran, so the headline is its header alone
    assert f"<!-- headline:begin -->\n{HEADER}\n<!-- headline:end -->" in Path("HEAD.md").read_text()


def test_optuna_sweep_minimises_the_outer_valid_loss_over_an_interval():
    cli("--multirun", "sweeper=optuna", "hydra.sweeper.n_trials=3", "optimizer=fedavg", "num_runs=1",
        "num_rounds=10", "eval_every=5", "local_learning_rate=tag(log, interval(0.05, 2.0))")
    import mlflow
    from omegaconf import OmegaConf

    mlflow.set_tracking_uri(f"sqlite:///{Path('outputs/mlflow.db').resolve()}")
    runs = mlflow.search_runs(experiment_names=["tuning_optuna"], output_format="list")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(trials) == 3 and len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    rates = [float(r.data.params["local_learning_rate"]) for r in trials]
    assert all(0.05 <= g <= 2.0 for g in rates) and len(set(rates)) == 3  # sampled, not a grid
    (result,) = Path("outputs/multirun").rglob("optimization_results.yaml")
    best = OmegaConf.load(result)
    final = {float(r.data.params["local_learning_rate"]): r.data.metrics["final_outer_valid_loss"] for r in trials}
    assert best.best_value == pytest.approx(min(final.values()), rel=1e-6)
    assert final[best.best_params.local_learning_rate] == pytest.approx(best.best_value, rel=1e-6)


def test_shipped_aggregator_benchmarks_under_its_own_name():
    from lagg_pipeline import pretrained

    (variant, name), *_ = pretrained.available()
    out = cli(f"optimizer={variant}", f"pretrained={name}", *TINY_BENCH)
    assert f"{variant}@{name}" in out.stdout
    methods = {r.data.tags.get("method") for r in mlflow_runs()}
    assert methods == {f"{variant}@{name}", "fedavg"}
    alone = cli(f"optimizer={variant}", f"pretrained={name}", "with_fedavg=false", *TINY_BENCH)
    assert "fedavg" not in alone.stdout and len(mlflow_runs()) == 3
    listing = cli("pretrained=list").stdout
    assert f"pretrained={name}" in listing and "re-create: python -m lagg_pipeline experiment=pretrain_" in listing


def test_sigterm_exits_cleanly_with_a_resumable_killed_run():
    args = ["optimizer=lopt_a", "mode=meta_train", *TINY_META, "num_outer_steps=40", "save_iter=3",
            "progress=false"]
    proc = subprocess.Popen([sys.executable, "-m", "lagg_pipeline", *args, "checkpoint_dir=termed"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not list(Path("termed").rglob("ckpt_00000003.npz")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr
    ours = [line for line in stderr.splitlines() if line.startswith("lagg_pipeline:")]  # MLflow logs its own
    assert len(ours) == 1 and "Traceback" not in stderr and "continue with resume=true" in ours[0]
    (run,) = mlflow_runs()
    assert run.info.status == "KILLED"
    out = cli(*args, "checkpoint_dir=termed", "resume=true")
    assert "resuming" in out.stdout
    cli(*args, "checkpoint_dir=straight")
    (termed,) = [p for p in Path("termed").iterdir() if p.is_dir()]
    (straight,) = [p for p in Path("straight").iterdir() if p.is_dir()]
    a, b = np.load(straight / "meta_params.npz"), np.load(termed / "meta_params.npz")
    for name in a.files:
        if name != "__metadata__":
            np.testing.assert_array_equal(a[name], b[name])
    statuses = sorted(r.info.status for r in mlflow_runs())
    assert statuses == ["FINISHED", "FINISHED"]  # the killed run was resumed and finished


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_mlflow_server(port: int, root: Path) -> subprocess.Popen:
    import urllib.request

    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{root / 'db.sqlite'}", "--default-artifact-root", str(root / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server
        except OSError:
            time.sleep(0.5)
    raise AssertionError("mlflow server did not start")


def _kill_group(proc: subprocess.Popen) -> None:
    import os

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers
    proc.wait()


def _wait_for(pattern: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not list(Path("ck").glob(f"*/{pattern}")):
        assert proc.poll() is None and time.time() < deadline, f"no {pattern}: {proc.communicate()}"
        time.sleep(0.1)


def test_tracking_server_killed_mid_run_loses_no_metric():
    """A real MLflow server dies during meta-training: training and checkpoints go on, the
    metrics wait in a local buffer and reach the server once it is back."""
    import os

    from mlflow.tracking import MlflowClient

    port, root = _free_port(), Path("server").resolve()
    server = _start_mlflow_server(port, root)
    steps = 40
    train = subprocess.Popen([sys.executable, "-m", "lagg_pipeline", "optimizer=lopt", "mode=meta_train", *TINY_META,
                              f"num_outer_steps={steps}", "trunc_length=10", "progress=false", "checkpoint_dir=ck",
                              f"tracking.uri=http://127.0.0.1:{port}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for("ckpt_00000004.npz", train)
        _kill_group(server)
        _wait_for("ckpt_00000014.npz", train)  # training and checkpoints go on without the server
        os.kill(train.pid, signal.SIGSTOP)  # hold it while the server restarts (that takes a while)
        server = _start_mlflow_server(port, root)
        os.kill(train.pid, signal.SIGCONT)
        out, err = train.communicate(timeout=600)
    finally:
        if train.poll() is None:
            train.kill()
        _kill_group(server)
    assert train.returncode == 0, err[-3000:]
    assert "tracking store unavailable" in out and "metrics are kept in" in out
    assert "tracking store reachable again: buffered metrics of run" in out
    server = _start_mlflow_server(port, root)
    try:
        client = MlflowClient(f"http://127.0.0.1:{port}")
        (run,) = client.search_runs([client.get_experiment_by_name("lagg_pipeline").experiment_id])
        assert run.info.status == "FINISHED"
        for name in ("meta_loss", "seconds_per_outer_step"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, name)) == list(range(1, steps + 1))
    finally:
        _kill_group(server)
    assert not list(Path("outputs/mlflow_pending").glob("*.jsonl"))  # the buffer was emptied


def test_parallel_sweep_over_benchmark_keys_meta_trains_once():
    cli("--multirun", "launcher=joblib", "optimizer=lopt_a", *TINY_META, "checkpoint_dir=ck",
              "num_runs=2", "num_rounds=10,20", "eval_every=10", "progress=false")
    (folder,) = [p for p in Path("ck").iterdir() if p.is_dir()]  # nothing moved aside
    assert sorted(p.name for p in folder.glob("ckpt_*.npz")) == ["ckpt_00000002.npz", "ckpt_00000004.npz"]
    # each job's own aggregator (a shipped one benchmarked beside it is tagged baseline_for)
    learned = [r for r in mlflow_runs() if r.data.tags.get("optimizer") == "lopt_a" and "baseline_for" not in r.data.tags]
    reused = [r for r in learned if "reused_meta_training" in r.data.tags]
    assert len(learned) == 2 and len(reused) == 1
    trained = next(r for r in learned if r not in reused)
    assert reused[0].data.tags["reused_meta_training"] == trained.info.run_id
    assert "meta_loss" in trained.data.metrics and "meta_loss" not in reused[0].data.metrics


def test_submitit_local_launcher_runs_each_job_in_its_own_process():
    cli("--multirun", "launcher=submitit_local", "optimizer=fedavg,fedadam", *TINY_BENCH)
    children = [r for r in mlflow_runs() if r.data.tags.get("mlflow.parentRunId")]
    assert sorted(r.data.tags["optimizer"] for r in children) == ["fedadam", "fedavg"]
    assert all(r.info.status == "FINISHED" for r in children)
    assert list(Path("outputs/multirun").rglob(".submitit"))  # submitit's own job folders


def test_four_parallel_jobs_share_one_sqlite_store_without_losing_anything():
    cli("--multirun", "launcher=joblib", "hydra.launcher.n_jobs=4", "optimizer=fedavg,fedadam,sgd,adam",
        *TINY_BENCH)
    from mlflow.tracking import MlflowClient

    children = [r for r in mlflow_runs() if r.data.tags.get("mlflow.parentRunId")]
    assert sorted(r.data.tags["optimizer"] for r in children) == ["adam", "fedadam", "fedavg", "sgd"]
    assert all(r.info.status == "FINISHED" for r in children)
    for run in children:
        steps = sorted(m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train_loss"))
        assert steps == list(range(1, 21)), run.data.tags["optimizer"]


def test_outer_optimizer_example_runs():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "outer_optimizer.py")], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "DiLoCo outer step" in out.stdout and "shipped LAgg-A" in out.stdout


def test_warm_fills_the_cache_with_the_step_a_later_job_loads_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")  # the suite's own cache would win over compile_cache_dir
    cache = tmp_path / "xla"
    args = [f"compile_cache_dir={cache}", *TINY_META, "progress=false"]
    out = cli("mode=warm", *args).stdout
    assert "warm: compiled the lagg_a meta-training step on digits_mlp (K=8, H=4) in " in out and str(cache) in out
    assert not Path("outputs/mlflow.db").exists() and not Path("outputs/checkpoints").exists()
    (entry,) = cache.glob("jit__step-*")
    stored = entry.stat().st_mtime_ns
    cli("mode=meta_train", *args)
    # the job's step had the warmed key: loaded, so neither compiled under another key nor stored again
    assert list(cache.glob("jit__step-*")) == [entry] and entry.stat().st_mtime_ns == stored
    with_other_settings = cli("mode=warm", *args, "num_grads=4").stdout
    assert "(K=4, H=4)" in with_other_settings and len(list(cache.glob("jit__step-*"))) == 2

