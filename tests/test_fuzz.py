"""Hostile and invalid command lines: one line, a non-zero exit, nothing executed or written.

Each case runs the real entry point in-process: composition, schema, value checks and the
input checks (saved aggregators, legacy pickles, tracking server) all happen before Hydra
creates a run folder, so a refused command leaves no trace under outputs/.
"""
import pickle

import pytest

from lagg_pipeline import cli


class _Evil:
    def __reduce__(self):
        import os

        return os.system, ("touch pwned",)


@pytest.fixture()
def files(tmp_path):
    """The files the hostile cases point at (written in the per-test working directory)."""
    import jax

    from lagg_pipeline.aggregators.learned import LearnedAggregator
    from lagg_pipeline.checkpoint import save_params

    params = LearnedAggregator("lagg_a", 8, 32).init_meta_params(jax.random.PRNGKey(0))
    save_params("k8.npz", params, {"variant": "lagg_a", "num_grads": 8, "hidden_size": 32})
    params16 = LearnedAggregator("lagg_a", 16, 32).init_meta_params(jax.random.PRNGKey(0))
    save_params("k16.npz", params16, {"variant": "lagg_a", "num_grads": 16, "hidden_size": 32})
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 definitely not a zip" * 10)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "evil.pickle").write_bytes(pickle.dumps(_Evil(), protocol=4))
    return tmp_path


CASES = [
    # wrong types
    ["num_grads=abc"], ["num_local_steps=1.5"], ["local_learning_rate=fast"], ["seed=x"], ["progress=maybe"],
    ["resume=perhaps"], ["num_runs=[1,2]"], ["task.hidden_sizes=abc"],
    # out of range
    ["num_grads=0"], ["num_local_steps=-1"], ["local_batch_size=0"], ["local_batch_size=100000"],
    ["local_learning_rate=0"], ["learning_rate=-1"], ["num_runs=0"], ["num_rounds=0"], ["eval_every=0"],
    ["hidden_size=0"], ["num_tasks=0"], ["trunc_length=1"], ["pes_std=0"], ["num_inner_steps=0"],
    ["truncation_schedule_min_length=5000"], ["num_outer_steps=0"], ["save_iter=0"], ["checkpoints_to_keep=0"],
    ["beta=1.0"], ["beta=-0.1"], ["weight_decay=-1"], ["optimizer=fedavgm", "optimizer.momentum=1.0"],
    ["optimizer=fedadam", "optimizer.b1=1.5"], ["optimizer=fedyogi", "optimizer.eps=0"], ["pes_devices=3"],
    ["partition=labels"], ["partition=dirichlet", "partition.num_clients=4"],
    ["partition=dirichlet", "partition.alpha=-1"],
    ["num_outer_steps=5"],  # not more than the warmup of the default schedule
    ["optimizer=fedavg", "distributed.enabled=true"], ["mode=meta_train", "distributed.enabled=true",
                                                       "distributed.coordinator_address=localhost"],
    # unknown keys and options
    ["foo=1"], ["num_grad=4"], ["optimizer=fedprox"], ["task=imagenet"], ["H=5"], ["k=7"], ["mode=train"],
    ["schedule=linear"], ["experiment=nope"], ["hparams_search=nope"], ["launcher=nope"], ["tracking=nope"],
    ["meta_tasks=[digits_mlp,nope]"], ["meta_tasks=[digits_mlp,digits_mlp]"],
    ["meta_tasks=[digits_mlp,mnist1d_mlp_small,mnist1d_mlp_deep]"],  # 8 particle pairs over 3 tasks
    ["meta_loss_split=resplit", "partition=dirichlet"],
    ["meta_loss_split=test"], ["pretrained=nope"], ["optimizer=fedavg", "pretrained=family_k8_h4_mix"],
    ["task.model=resnet"], ["task=mnist1d_mlp", "task.image_size=8"],
    # files: missing, garbage, wrong K, not a checkpoint, a pickle that would run a command
    ["mode=benchmark", "optimizer=lagg_a"], ["mode=benchmark", "optimizer=lagg_a", "checkpoint=missing.npz"],
    ["mode=benchmark", "optimizer=lagg_a", "checkpoint=garbage.npz"],
    ["mode=benchmark", "optimizer=lagg_a", "checkpoint=notes.txt"],
    ["mode=benchmark", "optimizer=lagg_a", "checkpoint=k8.npz", "num_grads=16"],
    ["mode=benchmark", "optimizer=lopt_a", "checkpoint=k8.npz"],
    ["optimizer=lagg_a", "checkpoint=k8.npz", "pretrained=family_k8_h4_mix"],
    ["mode=import_legacy", "optimizer=lopt_a"], ["mode=import_legacy", "optimizer=lopt_a", "legacy_path=nope.pickle"],
    ["mode=import_legacy", "optimizer=lopt_a", "legacy_path=evil.pickle"],
    ["mode=import_legacy", "optimizer=fedavg", "legacy_path=evil.pickle"],
    ["mode=benchmark", "optimizer=fedavg", "resume=true"],
    ["mode=warm", "optimizer=fedavg"], ["mode=warm", "pretrained=family_k8_h4_mix"],
    # keys a job would accept and not use
    ["mode=meta_train", "optimizer=lagg_a", "pretrained=family_k8_h4_mix"],
    ["mode=meta_train", "optimizer=lagg_a", "checkpoint=k8.npz"],
    ["mode=meta_train", "optimizer=lagg_a", "pretrained=family_k8_h4_mix", "distributed.enabled=true"],
    ["mode=meta_train", "optimizer=fedavg"],
    # meta_init=saved: without a file, outside mode=meta_train, a file of another K or none at all
    ["mode=meta_train", "optimizer=lagg_a", "meta_init=saved"],
    ["mode=benchmark", "optimizer=lagg_a", "meta_init=saved", "checkpoint=k8.npz"],
    ["mode=meta_train", "optimizer=lagg_a", "meta_init=saved", "checkpoint=k16.npz"],
    ["mode=meta_train", "optimizer=lagg_a", "meta_init=saved", "checkpoint=garbage.npz"],
    ["optimizer=fedavg", "mode=benchmark", "checkpoint=k8.npz"], ["optimizer=slowmo", "checkpoint=k8.npz"],
    ["optimizer=fedavg", "fedavg_local_learning_rate=0.3"],
    ["optimizer=lagg_a", "pretrained=family_k8_h4_mix", "with_fedavg=false", "fedavg_local_learning_rate=0.3"],
    ["optimizer=lagg_a", "mode=meta_train", "fedavg_local_learning_rate=0.3"],
    ["optimizer=lagg_a", "pretrained=family_k8_h4_mix", "fedavg_local_learning_rate=0"],
    # settings adopted from a saved aggregator that no run can use: its K=16 above the 10 clients
    ["optimizer=lagg_a", "checkpoint=k16.npz", "partition=dirichlet", "partition.num_clients=10"],
    # a tracking server that is not there
    ["optimizer=fedavg", "tracking.uri=http://127.0.0.1:9"],
    # a public dataset that is not prepared (the tests' TFDS data dir holds only the embedded ones)
    ["optimizer=lagg_a", "meta_tasks=[digits_mlp,image_mlp_fmst]"],
    ["optimizer=fedavg", "task=image_mlp_fmst"],
]


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("argv", CASES, ids=lambda a: " ".join(a)[:60])
def test_invalid_command_line_is_one_line_and_leaves_nothing(argv, files, capsys):
    before = sorted(p.name for p in files.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(list(argv))
    assert exit_info.value.code not in (0, None)
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("lagg_pipeline: error: ") and "Traceback" not in err, err
    assert not (files / "pwned").exists(), "the pickle ran its command"
    assert sorted(p.name for p in files.iterdir()) == before, "something was written"  # no outputs/, no files


def test_a_family_member_without_its_data_is_named_before_anything_runs(files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["optimizer=lagg_a", "meta_tasks=[digits_mlp,image_mlp_fmst]"])
    assert exit_info.value.code == 1  # missing data, as when the job's own task lacks it
    assert capsys.readouterr().err.startswith(
        "lagg_pipeline: error: meta_tasks: image_mlp_fmst: dataset fashion_mnist is not prepared in ")


def test_warm_without_a_compilation_cache_is_one_line(files, capsys, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    with pytest.raises(SystemExit):
        cli.main(["mode=warm", "compile_cache_dir=null"])
    assert capsys.readouterr().err == ("lagg_pipeline: error: mode=warm is not allowed with compile_cache_dir=null; "
                                       "it fills XLA's persistent compilation cache\n")
