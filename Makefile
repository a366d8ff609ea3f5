# lagg_pipeline -- `make help` lists the targets.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install install-dev run test test-fast test-slow sweep ui bench bench-scaling bench-profile bench-xla bench-compare tune tune-status tune-extend tune-federated results results-federated report recommend clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

# The install ends by compiling `make run`'s meta-training step into XLA's persistent cache
# (mode=warm), so the first step a new user waits for loads instead of compiling.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	$(PY) -m lagg_pipeline mode=warm
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv and install the package (quick when nothing changed)

install-dev: $(VENV)/.installed-dev ## install plus the test dependencies

run: install ## the main job on the embedded default dataset (ARGS="key=value ..." to override)
	$(PY) -m lagg_pipeline $(ARGS)

test: install-dev ## all tests: the fast set, then the slow end-to-end smoke tests
	$(PY) -m pytest
	$(PY) -m pytest -m slow

test-fast: install-dev ## the fast tests only
	$(PY) -m pytest

test-slow: install-dev ## the slow end-to-end smoke tests only
	$(PY) -m pytest -m slow

sweep: install ## a grid: fedavg and slowmo x H x local learning rate, one MLflow parent run
	$(PY) -m lagg_pipeline --multirun optimizer=fedavg,slowmo H=4,8,16 local_learning_rate=0.5,0.3,0.1 $(ARGS)

ui: install ## serve the MLflow UI of the local store; prints the URL of the runs table (ARGS="--experiment results")
	$(PY) -m lagg_pipeline.ui $(ARGS)

bench: install ## the speed yardstick: rounds, PES steps, compile, memory, % of the matmul limit (one run)
	$(PY) -m lagg_pipeline.bench $(ARGS)

bench-scaling: install ## PES step and round time against K, H, B, parameters: table, log-log plot, exponents (docs/performance)
	$(PY) -m lagg_pipeline.bench.scaling --out docs/performance --mlflow $(ARGS)

bench-xla: install ## XLA's CPU options measured in alternating processes: round, PES step, compile (docs/performance)
	$(PY) -m lagg_pipeline.bench.xla --readme docs/performance.md $(ARGS)

REF ?= HEAD
bench-compare: install ## this tree against another git revision, alternating processes, with the probe (REF=<rev>; docs/performance)
	$(PY) -m lagg_pipeline.bench.compare $(REF) --readme docs/performance.md $(ARGS)

bench-profile: install ## per-op profile of the digits and MNIST-1D PES steps (outputs/bench_profile)
	$(PY) -m lagg_pipeline.bench.profile outputs/bench_profile $(ARGS)

# Baselines tuned on outer-valid (never the test split) at the judged horizon: every grid point
# 1000 rounds x 3 seeds, chosen by the mean outer-valid loss from round 100 among points where no
# seed diverged (docs/tuning.md); the choices go to conf/tuned_hparams/<task>/<optimizer>.yaml.
# Every recipe sets skip_finished=true: after an interruption, `make tune` again runs only the points
# not finished in the store (`make tune-status` lists them).
# mnist1d_large_mlp (the paper's data regime) first: the main comparison; then its unseen-architecture
# row, the 4-hidden-layer MLP on the same data.
BASELINES    := fedavg slowmo fedavgm diloco fedadam fedyogi sgd adam
TUNE_TASKS   ?= mnist1d_large_mlp mnist1d_large_mlp_deep mnist5k_mlp mnist1d_mlp_deep digits_mlp mnist1d_mlp
tune: install ## grid-search every baseline (MLflow experiment "tuning"), write conf/tuned_hparams/
	for task in $(TUNE_TASKS); do for opt in $(BASELINES); do \
		$(PY) -m lagg_pipeline --multirun hparams_search=$$opt task=$$task H=4,8 || exit 1; done; done
	$(MAKE) tune-federated

tune-status: install ## which baselines are tuned, at which budget (rounds x seeds), which sit on a grid edge, grids in progress
	@$(PY) -m lagg_pipeline.tuning_records status

tune-extend: install ## sweep one step past each grid edge a tuned choice sits on, select again (repeat until none)
	$(PY) -m lagg_pipeline.tuning_records extensions | while read -r overrides; do \
		$(PY) -m lagg_pipeline --multirun $$overrides || exit 1; done
	$(PY) -m lagg_pipeline mode=select_tuned

# The Results (docs/results.md, and the README's headline): tuned baselines and the shipped
# aggregators, 5 seeds x 1000 rounds, into the MLflow experiment "results"; then `make report`.
# The paper's data regime: mnist1d_large_mlp (70,000 signals; ~91 epochs in 1000 rounds at H=4) and the
# unseen 4-hidden-layer MLP on it, mnist1d_large_mlp_deep.
# The small-data regime: digits_mlp and MNIST-1D at 10,000 signals (seen by the families), the
# unseen mnist5k_mlp and the 4-hidden-layer MLP mnist1d_mlp_deep: hundreds to thousands of epochs.
# Heterogeneous clients (results-federated): MNIST-1D 70k and 10k over 64 Dirichlet(0.1) and Dirichlet(1.0) clients.
# Each group's curves are committed there: a session measures some groups, the report judges all.
# skip_finished=true: run again after an interruption, it reruns only the rows not finished in the store.
RESULTS_DATA := docs/results/data
RESULTS_ARGS := tracking.experiment=results num_runs=5 num_rounds=1000 eval_every=50 progress=false
SHIPPED_ARGS := $(RESULTS_ARGS) with_fedavg=false skip_finished=true
RESULT_TASKS := mnist1d_large_mlp mnist1d_large_mlp_deep digits_mlp mnist1d_mlp mnist5k_mlp mnist1d_mlp_deep
LAGG_A_FILES := mnist1d_large_k8_h4_mix,mnist1d_large_k8_h4_mix_cont,family_k8_h4,family_k8_h4_mix,family4_k8_h4_mix75
LOPT_A_FILES := family_k8_h4_mix,family4_k8_h4_mix
# The paper-regime aggregator also at the larger local learning rates its baselines are tuned to (the
# outer-valid verdict chooses among them; recommended.yaml records a γ other than the meta-trained 0.5).
GAMMA_FILE   := optimizer=lagg_a pretrained=mnist1d_large_k8_h4_mix local_learning_rate=1.0,2.0 task=mnist1d_large_mlp
# Its continuation (meta-trained at 1.0) also at 2.0.
CONT_GAMMA   := optimizer=lagg_a pretrained=mnist1d_large_k8_h4_mix_cont local_learning_rate=2.0 task=mnist1d_large_mlp
# That continuation continued at H=8: run in the paper-regime groups (mnist1d_large_mlp and its deeper
# MLP, i.i.d. and over clients), the regime it was meta-trained in.
H8_FILE      := optimizer=lagg_a pretrained=mnist1d_large_k8_h8_mix_cont
COMMA := ,
BASELINE_LIST := $(subst $(eval) ,$(COMMA),$(BASELINES))
TASK_LIST := $(subst $(eval) ,$(COMMA),$(RESULT_TASKS))
results: install ## benchmark tuned baselines and shipped aggregators (i.i.d., then over clients: results-federated), then `make recommend report`
	for task in $(RESULT_TASKS); do \
		$(PY) -m lagg_pipeline --multirun optimizer=$(BASELINE_LIST) task=$$task H=4,8 $(RESULTS_ARGS) skip_finished=true \
			|| exit 1; done
	$(PY) -m lagg_pipeline --multirun optimizer=lagg_a task=$(TASK_LIST) H=4,8 $(SHIPPED_ARGS) pretrained=$(LAGG_A_FILES)
	$(PY) -m lagg_pipeline --multirun optimizer=lopt_a task=$(TASK_LIST) H=4,8 $(SHIPPED_ARGS) pretrained=$(LOPT_A_FILES)
	for rows in '$(GAMMA_FILE)' '$(CONT_GAMMA)'; do \
		$(PY) -m lagg_pipeline --multirun $$rows H=4,8 $(SHIPPED_ARGS) || exit 1; done
	$(PY) -m lagg_pipeline --multirun $(H8_FILE) task=mnist1d_large_mlp,mnist1d_large_mlp_deep H=4,8 $(SHIPPED_ARGS)
	$(MAKE) results-federated

# Heterogeneous clients (docs/clients.md): MNIST-1D at 70,000 signals (the paper's data regime) and
# at 10,000 over 64 clients with Dirichlet(0.1) and Dirichlet(1.0) label skew, 8 per round, H=4;
# baselines tuned over those same clients.
FED_BASELINES := fedavg fedavgm fedadam diloco
FED_CLIENTS := partition=dirichlet partition.num_clients=64 partition.alpha=0.1,1.0
FED_ARGS := task=mnist1d_large_mlp,mnist1d_mlp H=4 $(FED_CLIENTS)
tune-federated: install ## tune the heterogeneous-clients baselines over those same clients, then select
	for opt in $(FED_BASELINES); do \
		$(PY) -m lagg_pipeline --multirun hparams_search=$$opt $(FED_ARGS) || exit 1; done
	$(PY) -m lagg_pipeline mode=select_tuned

results-federated: install ## the heterogeneous-clients comparison (MNIST-1D 70k and 10k, Dirichlet 0.1 and 1.0; part of make results), then `make recommend report`
	$(PY) -m lagg_pipeline --multirun optimizer=$(subst $(eval) ,$(COMMA),$(FED_BASELINES)) $(FED_ARGS) \
		$(RESULTS_ARGS) skip_finished=true
	$(PY) -m lagg_pipeline --multirun optimizer=lagg_a pretrained=$(LAGG_A_FILES) $(FED_ARGS) $(SHIPPED_ARGS)
	$(PY) -m lagg_pipeline --multirun optimizer=lopt_a pretrained=$(LOPT_A_FILES) $(FED_ARGS) $(SHIPPED_ARGS)
	for rows in '$(GAMMA_FILE)' '$(CONT_GAMMA)'; do \
		$(PY) -m lagg_pipeline --multirun $$rows H=4 $(FED_CLIENTS) $(SHIPPED_ARGS) || exit 1; done
	$(PY) -m lagg_pipeline --multirun $(H8_FILE) task=mnist1d_large_mlp H=4 $(FED_CLIENTS) $(SHIPPED_ARGS)
	$(MAKE) recommend report

report: install ## the comparison report of the "results" experiment: docs/results.md and the README's headline
	$(PY) -m lagg_pipeline mode=report tracking.experiment=results report_dir=docs/results readme=docs/results.md \
		headline=README.md results_archive=$(RESULTS_DATA)

recommend: install ## regenerate pretrained/recommended.yaml from the outer-valid verdict of the "results" experiment
	$(PY) -m lagg_pipeline mode=recommend tracking.experiment=results results_archive=$(RESULTS_DATA)

clean: ## remove outputs, caches and build files (keeps .venv)
	rm -rf outputs multirun build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
