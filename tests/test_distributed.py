"""Two-process training through the launchers (CPU, gloo): ZeRO-2 with `deepspeed`, ZeRO-3 with `torchrun`, both
through the static latent block, with ranks of different latent counts; the two end at the same parameters."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_coconut.py"

pytestmark = pytest.mark.distributed


def _settings(tmp_path, zero_stage):
    return [
        f"save_path={tmp_path}", "name=dist", "model_id=tiny", "device=cpu", f"zero_stage={zero_stage}",
        "model_overrides={text_hidden_size: 32, text_layers: 1, text_intermediate_size: 64}",
        "synthetic={n_train: 16, n_val: 6, hops: 2, seed: 5}",
        "num_epochs=2", "epochs_per_stage=1", "max_latent_stage=2", "uniform_prob=0.5",
        "batch_size_training=2", "gradient_accumulation_steps=2", "eval_batch_size=3", "max_new_tokens=10",
        "latent_passes=static",  # the latent block, eagerly: under ZeRO-3 inside one gather of the language model
        "lr=1e-3",  # enough for the second epoch to move the parameters measurably
        # ZeRO-2 steps on the device (torch's fused AdamW: overflow and clip factor never read on the host) across two
        # ranks' partitions; ZeRO-3 with DeepSpeed's own step, and (with the flat reduction) on the device: all runs
        # end at the same parameters
        *(["optimizer=adamw_fused"] if zero_stage == 2 else []),
        "max_grad_norm=0.05",  # every step clips: the clip factor over both ranks' partitions is compared too
    ]


def _launch(cmd, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(ROOT), MASTER_PORT=free_port())
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    history = json.loads((tmp_path / "dist" / "history.json").read_text())
    assert [h["stage"] for h in history] == [0, 1]
    assert all(h["val_accuracy"] is not None and h["num_answers"] == 6 for h in history)
    assert (tmp_path / "dist" / "checkpoints" / "latest").read_text().strip() == "epoch_002"
    return proc.stdout + proc.stderr


FINAL_WEIGHTS = {}  # zero stage -> (final weights, weights after epoch 1) of its run


def _exported_weights(tmp_path, export="final") -> dict:
    from safetensors.torch import load_file

    files = sorted((tmp_path / "dist" / export).glob("*.safetensors"))
    assert files, "the run exported no final weights"
    weights = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def test_two_process_zero2_through_deepspeed_launcher(tmp_path):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher is not installed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", free_port(), str(RECIPE)]
    for s in _settings(tmp_path, 2):
        cmd += ["--set", s]
    output = _launch(cmd, tmp_path)
    assert "optimizer step: gradient checks and clipping on the device" in output
    FINAL_WEIGHTS[2] = _exported_weights(tmp_path), _exported_weights(tmp_path, "epoch_001")


@pytest.mark.parametrize("flat", [False, True], ids=["per_parameter_reduction", "flat_leaf_reduction"])
def test_two_process_zero3_through_torchrun_keeps_ranks_in_step(tmp_path, flat):
    # uniform_prob mixes latent counts per sample, so the ranks' batches need different numbers of passes: ZeRO-3's
    # gathers must still match (one gather of the language model per call, whatever the passes), or the run hangs.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", free_port(), str(RECIPE)]
    for s in _settings(tmp_path, 3) + [f"zero3_flat_leaf_reduction={str(flat).lower()}"]:
        cmd += ["--set", s]
    if flat:
        cmd += ["--set", "optimizer=adamw_fused"]  # the step without host reads, across the two ranks' partitions
        # the block's fused ops (Triton, interpreted): inside the gathered leaf each weight's gradient is taken once
        # over the passes (engine/model/shared_weight.py; these tiny weights stay whole under the persistence
        # threshold, their release between forward and backward is tests/test_zero3_one_call.py's)
        cmd += ["--set", "layer_ops=fused"]
    output = _launch(cmd, tmp_path)
    assert ("ZeRO-3 leaf gradients: reduced together per leaf" in output) is flat
    assert ("optimizer step: gradient checks and clipping on the device" in output) is flat
    FINAL_WEIGHTS["3 flat" if flat else 3] = _exported_weights(tmp_path), _exported_weights(tmp_path, "epoch_001")


@pytest.mark.parametrize("run", [3, "3 flat"])
def test_zero3_through_the_latent_block_ends_where_zero2_ends(run):
    if not {2, run} <= set(FINAL_WEIGHTS):
        pytest.skip("needs both two-process runs above (run the module as a whole)")
    (zero2, zero2_epoch1), (zero3, _) = FINAL_WEIGHTS[2], FINAL_WEIGHTS[run]
    assert zero2.keys() == zero3.keys()
    worst = max((zero2[k].float() - zero3[k].float()).abs().max().item() for k in zero2)
    moved = max((zero2[k].float() - zero2_epoch1[k].float()).abs().max().item() for k in zero2)
    assert moved > 1e-3, f"the second epoch must move the parameters for this comparison to mean anything ({moved:.3g})"
    assert worst <= 1e-4, f"ZeRO-3 ({run}) and ZeRO-2 parameters differ by up to {worst:.3g}"


def test_shutdown_destroys_the_process_group_and_is_idempotent(tmp_path):
    """The recipe's exit path: the group is gone afterwards, and a second call (or no group at all) is a no-op.
    In a child process: this one may hold a group of its own."""
    code = (
        "import torch, torch.distributed as dist\n"
        "from engine.training.distributed import shutdown_distributed\n"
        "shutdown_distributed()\n"  # no group yet: nothing to do
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "assert dist.is_initialized()\n"
        "shutdown_distributed(wait_for_peers=True)\n"  # one rank: no barrier to wait in
        "assert not dist.is_initialized()\n"
        "shutdown_distributed()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]



# the two-rank workers' start: argv is (device, dtype); cuda: NCCL and DeepSpeed's side streams, else gloo on the CPU
WORKER_PREAMBLE = """
import os
import sys
import torch
import deepspeed
import deepspeed.comm as dist
from engine.training import zero3_gathers
from engine.training.distributed import shutdown_distributed

cuda = sys.argv[1] == "cuda"
if cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
rank = dist.get_rank()


def report_ok():  # a file per rank: the ranks' stdout lines can interleave mid-line
    with open(f"ok.rank{rank}", "w") as f:
        f.write("ok")
"""


TEARDOWN_ABORT = "terminate called without an active exception"


def _torchrun(args: list[str], cwd, *, cpu: bool, finished=None) -> str:
    """Two ranks through torchrun (on a free port), the project on the path; the output of a run that must succeed.
    `finished()`: whether every rank reported its work done; then, and only then, a rank that aborted while the
    process was torn down afterwards (a C++ thread of the CPU collectives destroyed while joinable, rare even after
    `shutdown_distributed`) is a warning, not a failure: the work it checked was done."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    # DeepSpeed picks its accelerator once per process from DS_ACCELERATOR, which an earlier CPU test in this process
    # may have set (init_distributed does): GPU ranks must not inherit it
    env["DS_ACCELERATOR"] = "cpu" if cpu else "cuda"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", free_port(), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and finished is not None and finished() and TEARDOWN_ABORT in proc.stderr:
        warnings.warn(f"a rank aborted at process teardown after finishing its work ({TEARDOWN_ABORT!r})")
        return proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_only_a_teardown_abort_after_finished_work_passes(monkeypatch):
    """`_torchrun` lets through a failed exit only when every rank had finished and the abort was the teardown's."""
    for returncode, stderr, finished, passes in ((-6, TEARDOWN_ABORT, True, True), (-6, TEARDOWN_ABORT, False, False),
                                                 (1, "Traceback: AssertionError", True, False), (0, "", False, True)):
        done = subprocess.CompletedProcess([], returncode, stdout="out", stderr=stderr)
        monkeypatch.setattr(subprocess, "run", lambda *a, _done=done, **k: _done)
        if passes:
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                assert _torchrun([], ".", cpu=True, finished=lambda _f=finished: _f) == "out"
        else:
            with pytest.raises(AssertionError, match="exit"):
                _torchrun([], ".", cpu=True, finished=lambda _f=finished: _f)


def _run_worker(tmp_path, worker: str, device: str, dtype: str) -> None:
    """`WORKER_PREAMBLE` + `worker` on two ranks of `device`; each rank must reach its `report_ok()`."""
    import torch

    from engine.training.zero_step import deepspeed_release_checked

    if not deepspeed_release_checked():
        pytest.skip("the ZeRO-3 replacements apply to checked DeepSpeed releases only")
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    script = tmp_path / "worker.py"
    script.write_text(WORKER_PREAMBLE + worker)
    def reached():
        return sorted(p.name for p in tmp_path.glob("ok.rank*"))

    stdout = _torchrun([str(script), device, dtype], tmp_path, cpu=device == "cpu",
                       finished=lambda: reached() == ["ok.rank0", "ok.rank1"])
    assert reached() == ["ok.rank0", "ok.rank1"], (reached(), stdout[-2000:])


ZERO3_GATHERS_WORKER = """
# threshold 20: the first layers' weights and biases (odd sizes: padded partitions) are partitioned and fetched
# module by module through the coalesced all-gather; the last layers' (4, 12 and 3 elements) are persistent, whole
# on each rank and re-gathered from the updated partitions after every step
config = {"train_micro_batch_size_per_gpu": 3, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 20,
                                "stage3_prefetch_bucket_size": 0}}
if sys.argv[2] == "bfloat16":
    config["bf16"] = {"enabled": True}


def engine(ours):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 23), torch.nn.LayerNorm(23), torch.nn.GELU(),
                                torch.nn.Linear(23, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(device)
    eng, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.05),
                                   config=config)
    if ours:
        assert zero3_gathers.use_coalesced_persistent_gather(eng.optimizer) is None
        assert zero3_gathers.use_batched_release(eng.optimizer) is None
    return eng


def available_count(eng):  # the coordinator's count of gathered elements, which the release must keep right
    return getattr(eng.optimizer.parameter_offload.get_param_coordinator(), zero3_gathers._COORDINATOR_AVAILABLE)


def use(ours):
    if ours:
        assert zero3_gathers.use_split_copy_out() is None
    else:
        zero3_gathers.restore_deepspeed_copy_out()


ours, theirs = engine(True), engine(False)
assert len(ours.optimizer.persistent_parameters) == 3, len(ours.optimizer.persistent_parameters)
released = {True: [], False: []}  # per step: elements whole before the step's release, after it, coordinator's count
states = {True: [], False: []}  # after each forward and backward: every parameter's status and size, the count


def state(eng):
    return [(p.ds_status.name, p.numel()) for p in eng.module.parameters()], available_count(eng)


freed = []  # the per-parameter release of our engine's coordinator: parameters it released plainly
free_whole = zero3_gathers._free_whole
zero3_gathers._free_whole = lambda coordinator, params, free_data=True: freed.append(len(params)) or free_whole(
    coordinator, params, free_data)
handed_back = []  # the batched release must not hand this plain setup to DeepSpeed's
ours.optimizer._deepspeed_partition_all_parameters = lambda: handed_back.append(1)
gathered, copies = [], []
count_gathered = zero3_gathers.gather_persistent_parameters
zero3_gathers.gather_persistent_parameters = lambda params: gathered.append(count_gathered(params)) or gathered[-1]
split_copy = torch.split_with_sizes_copy
torch.split_with_sizes_copy = lambda *a, **k: copies.append(len(k["out"])) or split_copy(*a, **k)
torch.manual_seed(1 + rank)  # each rank its own batches
for step in range(3):
    x, y = torch.randn(3, 7, device=device), torch.randn(3, 3, device=device)
    for eng in (ours, theirs):
        use(eng is ours)
        out = eng(x.to(next(eng.module.parameters()).dtype))
        states[eng is ours].append(state(eng))  # each module's parameters released after its forward ...
        eng.backward(torch.nn.functional.mse_loss(out.float(), y))
        states[eng is ours].append(state(eng))  # ... and after its backward, as DeepSpeed's release leaves them
        release = eng.optimizer._partition_all_parameters
        whole_before = sum(p.numel() for p in eng.module.parameters())  # released: a 0-element placeholder each
        eng.optimizer._partition_all_parameters = lambda: release() or released[eng is ours].append(
            (whole_before, sum(p.numel() for p in eng.module.parameters()), available_count(eng)))
        eng.step()
        eng.optimizer._partition_all_parameters = release
    use(False)
    for (name, a), b in zip(ours.module.named_parameters(), theirs.module.parameters()):
        assert a.ds_persist == b.ds_persist, name
        if a.ds_persist:  # whole on this rank now, gathered by each path
            assert a.shape == b.shape == a.ds_shape, name
            assert torch.equal(a.data, b.data), (step, name)
        with deepspeed.zero.GatheredParameters([a, b]):
            assert torch.equal(a.data, b.data), (step, name)
# every persistent parameter, every step, through the coalesced gather; the fetches of the two partitioned modules
# with two parameters each (forward and backward) and the persistent gather copied out in one kernel each
assert gathered == [3, 3, 3], gathered
# from the second step on the persistent parameters (19 elements) are whole when the step starts; both releases leave
# nothing whole and the coordinator's count the same
assert released[True] == released[False] == [(0, 0, 0), (19, 0, 0), (19, 0, 0)], released
assert not handed_back
assert states[True] == states[False], states
assert sum(freed) > 3 * 4, freed  # the partitioned modules' parameters after every forward and backward, plainly
assert copies.count(2) >= 3 * 4 and copies.count(3) == 3, copies
report_ok()
shutdown_distributed(wait_for_peers=True)  # a process group left to the interpreter's exit can abort it
"""


@pytest.mark.parametrize("device,dtype", [
    ("cpu", "float32"),
    pytest.param("cuda", "float32", marks=pytest.mark.gpu),
    pytest.param("cuda", "bfloat16", marks=pytest.mark.gpu),
])
def test_zero3_coalesced_gathers_match_deepspeed(tmp_path, device, dtype):
    """ZeRO-3 over two ranks (engine/training/zero3_gathers.py): the persistent parameters gathered after each step
    by one coalesced collective, and every coalesced gather copied out in one kernel, give exactly the parameters of
    DeepSpeed's per-parameter gathers and copies (on CUDA: NCCL, DeepSpeed's side streams, bf16 too)."""
    _run_worker(tmp_path, ZERO3_GATHERS_WORKER, device, dtype)


FLAT_REDUCTION_WORKER = """
from deepspeed.utils import set_z3_leaf_modules


class Block(torch.nn.Module):  # a ZeRO-3 leaf: its gradients are reduced in its backward hook
    def __init__(self, width):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.unused = torch.nn.Linear(3, 3)  # no gradient in this step: DeepSpeed zero-fills it
        self.scale = torch.nn.Parameter(torch.ones(1))  # one element: the second rank's partition holds no data

    def forward(self, x):
        return torch.tanh(self.norm(self.fc(x))) * self.scale


# a small bucket size splits a leaf's reduction into several buckets; odd widths pad the partitions
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "reduce_bucket_size": 150}}
if sys.argv[2].startswith("bfloat16"):  # bf16 gradients reduced, fp32 partitions accumulated
    config["bf16"] = {"enabled": True}
if sys.argv[2].endswith("fp32-reduction"):  # bf16 gradients converted to fp32 before the reduce-scatter
    config["communication_data_type"] = "fp32"


def engine(flat):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 11), Block(11), Block(11), torch.nn.Linear(11, 3)).to(device)
    set_z3_leaf_modules(model, [Block])
    eng, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.05),
                                   config=config)
    if flat:
        assert zero3_gathers.use_flat_leaf_reduction(eng.optimizer) is None
    return eng


ours, theirs = engine(True), engine(False)
reduced = []
bucket = zero3_gathers._reduce_bucket
zero3_gathers._reduce_bucket = lambda self, params, dtype: reduced.append(len(params)) or bucket(self, params, dtype)
torch.manual_seed(1 + rank)
for step in range(6):  # three optimizer steps of two micro-batches: copies, then adds into the gradient buffers
    x, y = torch.randn(2, 5, device=device), torch.randn(2, 3, device=device)
    for eng in (ours, theirs):
        out = eng(x.to(next(eng.module.parameters()).dtype))
        eng.backward(torch.nn.functional.mse_loss(out.float(), y))
        eng.step()
    for (name, a), b in zip(ours.module.named_parameters(), theirs.module.parameters()):
        with deepspeed.zero.GatheredParameters([a, b]):
            assert torch.equal(a.data, b.data), (step, name)
assert len(reduced) >= 6 * 2 and max(reduced) < 6, reduced  # every leaf, every backward, in several buckets
report_ok()
shutdown_distributed(wait_for_peers=True)
"""


@pytest.mark.parametrize("device,dtype", [
    ("cpu", "float32"),
    ("cpu", "bfloat16-fp32-reduction"),
    pytest.param("cuda", "float32", marks=pytest.mark.gpu),
    pytest.param("cuda", "bfloat16", marks=pytest.mark.gpu),
])
def test_zero3_flat_leaf_reduction_matches_deepspeed(tmp_path, device, dtype):
    """ZeRO-3 over two ranks: a leaf module's gradients reduced together (engine/training/zero3_gathers.py) give
    exactly the parameters of DeepSpeed's per-parameter reduction, with gradient accumulation, buckets split by
    reduce_bucket_size, padded partitions, a rank holding no data of a parameter and a parameter without a gradient;
    bf16 gradients reduced in fp32 (on CUDA: NCCL, DeepSpeed's reduction stream, bf16 too). Two ranks: the sums of
    two values are the same in any order, so the comparison is exact (with more ranks it would need a tolerance)."""
    _run_worker(tmp_path, FLAT_REDUCTION_WORKER, device, dtype)


def test_zero3_host_cost_harness_runs_every_path(tmp_path):
    """benchmarks/zero3_host_cost.py on two CPU ranks: a row per path and round, in the order asked, every phase
    timed; an unknown path is refused."""
    from benchmarks import zero3_host_cost

    assert zero3_host_cost.parse_args([]).paths == ["deepspeed", "engine"]
    with pytest.raises(SystemExit):
        zero3_host_cost.parse_args(["--paths", "engine,fast"])
    _torchrun(["-m", "benchmarks.zero3_host_cost", "--blocks", "3", "--warmup", "1", "--steps", "2", "--paths",
               "deepspeed,engine_walks,engine", "--rounds", "2", "--out", str(tmp_path)], ROOT, cpu=True,
              finished=lambda: (tmp_path / "zero3_host_cost.json").exists())  # rank 0 writes it when all is done
    rows = json.loads((tmp_path / "zero3_host_cost.json").read_text())["rows"]
    assert [(r["path"], r["round"]) for r in rows] == [(p, n) for n in (1, 2)
                                                       for p in ("deepspeed", "engine_walks", "engine")]
    for r in rows:
        assert r["ranks"] == 2 and r["tensors"] == 16
        assert all(r[f"{phase}_ms"] > 0 for phase in ("forward", "backward", "step")), r
    assert "| engine |" in (tmp_path / "zero3_host_cost.md").read_text()


def test_cuda_allocator_gets_expandable_segments_unless_told_otherwise(monkeypatch):
    """On CUDA the run sets the caching allocator to expandable segments before CUDA starts; a setting in the
    environment wins, the config can turn it off, and after CUDA has started nothing is set (torch reads the
    settings once)."""
    import torch

    from engine.training import distributed

    before = {name: os.environ.get(name) for name in distributed.ALLOCATOR_ENV}
    for name in distributed.ALLOCATOR_ENV:  # set first, so that monkeypatch restores them afterwards
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setattr(distributed, "_ALLOCATOR_SET_HERE", [])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert "had started" in distributed.choose_cuda_allocator()
    assert not any(os.environ.get(name) for name in distributed.ALLOCATOR_ENV)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert distributed.choose_cuda_allocator(expandable_segments=False) == "torch's defaults"
    assert not any(os.environ.get(name) for name in distributed.ALLOCATOR_ENV)
    assert distributed.choose_cuda_allocator() == distributed.EXPANDABLE_SEGMENTS
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert distributed.choose_cuda_allocator() == distributed.EXPANDABLE_SEGMENTS  # the same choice again
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.6")
    said = distributed.choose_cuda_allocator()
    assert "PYTORCH_ALLOC_CONF=garbage_collection_threshold:0.6" in said and "environment" in said
    monkeypatch.undo()  # what the test set is gone again: the later tests run with the environment they had
    assert {name: os.environ.get(name) for name in distributed.ALLOCATOR_ENV} == before


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_ranks_train_on_records_with_and_without_images(tmp_path, zero_stage):
    """A rank whose batch held no image skipped the vision tower while the other ran it: under ZeRO-2 the gradient
    buckets' sizes differed (gloo aborted), under ZeRO-3 the parameter gathers never paired up (a hang)."""
    from engine.data.records import read_jsonl, write_jsonl
    from engine.data.synthetic import generate_synthetic

    data = generate_synthetic(tmp_path / "data", n_train=12, n_val=4, hops=2, seed=5, image_size=112, progress=False)
    for split in ("train", "val"):
        records = read_jsonl(data[split])
        write_jsonl(data[split], [{**r, "image": None} if i % 3 == 0 else r for i, r in enumerate(records)])
    settings = [
        f"save_path={tmp_path}", "name=mixed", "model_id=tiny", "device=cpu", f"zero_stage={zero_stage}",
        "model_overrides={text_hidden_size: 32, text_layers: 1, text_intermediate_size: 64, image_size: 112, "
        "patch_size: 14}", f"train_path={data['train']}", f"val_path={data['val']}", "num_epochs=1",
        "max_latent_stage=2", "batch_size_training=2", "eval_batch_size=2", "max_new_tokens=4", "check_images=false",
    ]
    args = [str(RECIPE)]
    for s in settings:
        args += ["--set", s]
    history = tmp_path / "mixed" / "history.json"
    _torchrun(args, tmp_path, cpu=True, finished=history.is_file)
    assert json.loads(history.read_text())[0]["num_answers"] == 4
