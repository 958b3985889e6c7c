"""Issue 21, item 5: the libraries people train with work unchanged under ``torchfree.torch.install()``.

Each library runs one small deterministic job twice, each time in a fresh process: plain, and with
``install()`` called before the library is imported (so a library that binds ``torch.save`` at
import gets torchfree's). The two runs must end with the same parameters, optimizer and scheduler
states and RNG states, bit for bit; every file the job wrote with ``torch.save`` must read back with
plain ``torch.load`` as the plain run's file does, and the plain run's files must read back the same
under ``install()``. Every ``torch.save`` / ``torch.load`` call is counted (a wrapper around whatever
``torch.save`` / ``torch.load`` is then) and the calls handed to torch's own code are read from
``torchfree.torch._fallbacks``: the fallbacks each library is allowed are listed in EXPECTED_FALLBACKS,
with the reason.

The libraries are in the ``libs`` extra (pinned; the README test command installs it). Like torch (tests/conftest.py), a library that is
not installed skips its test, except under ``TORCHFREE_REQUIRE_TORCH=1`` (CI), where it fails.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest

from conftest import require_torch

pytestmark = [pytest.mark.needs_torch, pytest.mark.slow]


def require_lib(name):
    if importlib.util.find_spec(name) is None:
        if os.environ.get("TORCHFREE_REQUIRE_TORCH") == "1":
            pytest.fail(f"{name} not installed, but TORCHFREE_REQUIRE_TORCH=1 requires the library tests "
                        f"(the libs extra installs it)")
        pytest.skip(f"{name} not installed")


# ---- what runs in each fresh process -------------------------------------------------------------

PRELUDE = r'''
import collections, json, os, pickle, random, sys
lib, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
os.chdir(out)
import numpy as np
import torch
torch.set_num_threads(1)
if mode == "tf":
    import torchfree.torch as tft
    tft.install()
counts, callers = collections.Counter(), collections.Counter()

def _counted(name):
    inner = getattr(torch, name)
    def counted(*a, **k):
        counts[name] += 1
        caller = sys._getframe(1)
        callers[f"{name} {caller.f_code.co_filename.rpartition('site-packages/')[2]}:{caller.f_lineno}"] += 1
        return inner(*a, **k)
    setattr(torch, name, counted)

_counted("save")
_counted("load")

def rng_states():
    return {"torch": torch.get_rng_state(), "random": random.getstate(), "numpy": np.random.get_state()}

def finish(result):
    # the job's calls, before pickling the result (pickling a tensor calls torch.save itself)
    fb = {}
    if mode == "tf":
        fb = {f"{op}: {why}": n for (op, why), n in tft._fallbacks.items()}
    with open("counts.json", "w") as f:
        json.dump({"save": counts["save"], "load": counts["load"], "fallbacks": fb, "callers": dict(callers)}, f)
    with open("result.pkl", "wb") as f:
        pickle.dump(result, f)
'''

# transformers: a tiny Llama (tied embeddings: a storage shared by two state_dict entries) built
# from a config; save_pretrained(safe_serialization=False) + from_pretrained; then Trainer with
# save_safetensors=False saving checkpoint-3 (pytorch_model.bin, optimizer.pt, scheduler.pt,
# rng_state.pth, training_args.bin), and a second Trainer resuming from it.
TRANSFORMERS = r'''
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed
from transformers.utils import logging as hf_logging
hf_logging.set_verbosity_error()

cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                  tie_word_embeddings=True)
set_seed(0)
model = LlamaForCausalLM(cfg)
model.save_pretrained("pretrained", safe_serialization=False)
loaded = LlamaForCausalLM.from_pretrained("pretrained")
assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()

g = torch.Generator().manual_seed(1)
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 8), generator=g)]

def trainer(out_dir):
    set_seed(0)
    args = TrainingArguments(output_dir=out_dir, logging_dir="logs", max_steps=6, save_steps=3,
                             save_strategy="steps", per_device_train_batch_size=4, learning_rate=1e-2,
                             lr_scheduler_type="linear", warmup_steps=1, seed=0, data_seed=0, use_cpu=True,
                             save_safetensors=False, report_to=[], logging_strategy="no",
                             disable_tqdm=True, dataloader_num_workers=0)
    return Trainer(model=LlamaForCausalLM(cfg), args=args, train_dataset=data)

first = trainer("run")
first.train()
full = {k: v.clone() for k, v in first.model.state_dict().items()}
resumed = trainer("resumed")
resumed.train(resume_from_checkpoint="run/checkpoint-3")
finish({
    "pretrained": dict(loaded.state_dict()),
    "full": full,
    "params": dict(resumed.model.state_dict()),
    "optimizer": resumed.optimizer.state_dict(),
    "scheduler": resumed.lr_scheduler.state_dict(),
    "rng": rng_states(),
})
'''

# Lightning: Trainer.fit with ModelCheckpoint (every epoch, kept), then a fresh Trainer resuming with
# fit(ckpt_path=<the first epoch's checkpoint>).
LIGHTNING = r'''
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
import logging
logging.getLogger("lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
import warnings
warnings.filterwarnings("ignore")

g = torch.Generator().manual_seed(1)
x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)

class Net(L.LightningModule):
    def __init__(self, width=16):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))

    def training_step(self, batch, i):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)]

    def train_dataloader(self):
        # no shuffling: Lightning's checkpoint holds no RNG state, and resuming is then exact
        return DataLoader(TensorDataset(x, y), batch_size=8)

def fit(epochs, ckpt_path=None):
    L.seed_everything(0, verbose=False)
    model = Net()
    cb = ModelCheckpoint(dirpath="ckpts", filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_last=True)
    t = L.Trainer(max_epochs=epochs, callbacks=[cb], logger=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", devices=1, deterministic=True)
    t.fit(model, ckpt_path=ckpt_path)
    return t, model

first, m1 = fit(3)
full = {k: v.clone() for k, v in m1.state_dict().items()}
t, model = fit(3, ckpt_path="ckpts/epoch=0.ckpt")
finish({
    "full": full,
    "params": dict(model.state_dict()),
    "optimizer": t.optimizers[0].state_dict(),
    "scheduler": t.lr_scheduler_configs[0].scheduler.state_dict(),
    "global_step": t.global_step,
    "rng": rng_states(),
})
'''

# accelerate: save_state after one epoch (safe_serialization=False: pytorch_model.bin), a second
# epoch, load_state back into the same objects, the second epoch again.
ACCELERATE = r'''
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset

set_seed(0)
acc = Accelerator(cpu=True)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
dl = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
model, opt, dl, sched = acc.prepare(model, opt, dl, sched)

def epoch():
    for xb, yb in dl:
        loss = torch.nn.functional.mse_loss(model(xb), yb + 0.01 * torch.randn_like(yb))
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()

epoch()
acc.save_state("state", safe_serialization=False)
epoch()
full = {k: v.clone() for k, v in model.state_dict().items()}
acc.load_state("state")
epoch()
finish({
    "full": full,
    "params": dict(model.state_dict()),
    "optimizer": opt.state_dict(),
    "scheduler": sched.state_dict(),
    "rng": rng_states(),
})
'''

JOBS = {"transformers": TRANSFORMERS, "lightning": LIGHTNING, "accelerate": ACCELERATE}

# The calls handed to torch's own code under install(), per library, and why. Every other
# torch.save / torch.load went through torchfree.
# torchfree's writer writes torch's objects and plain containers, never a pickled instance of some
# other class (that needs pickle's reduce protocol run on it, which torch's own pickler does):
#   * numpy.ndarray: the RNG states' np.random.get_state() (transformers' rng_state.pth, one per
#     checkpoint: run/checkpoint-3, run/checkpoint-6, resumed/checkpoint-6; accelerate's
#     random_states_0.pkl);
#   * transformers.training_args.TrainingArguments: Trainer saves its arguments object whole
#     (training_args.bin, one per checkpoint).
# Their loads all go through torchfree (the RNG states' arrays are in its allowlist; no file is
# loaded with training_args.bin).
EXPECTED_FALLBACKS = {
    "transformers": {"save: an object of type numpy.ndarray": 3,
                     "save: an object of type transformers.training_args.TrainingArguments": 3},
    "lightning": {},
    "accelerate": {"save: an object of type numpy.ndarray": 1},
}

# the plain run's files read back under install() with weights_only=False, handed to torch's load:
# transformers' training_args.bin (3 of them; a TrainingArguments object)
EXPECTED_READ_FALLBACKS = {"transformers": 3, "lightning": 0, "accelerate": 0}

# the files each job writes with torch.save (relative to its folder)
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def run_job(lib, mode, out):
    import torchfree

    out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(torchfree.__file__)),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_DISABLED="true",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONHASHSEED="0",
               HF_HOME=str(out.parent / "hf_home"), PYTHONWARNINGS="ignore")
    code = textwrap.dedent(PRELUDE) + textwrap.dedent(JOBS[lib])
    r = subprocess.run([sys.executable, "-c", code, lib, mode, str(out)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, f"{lib} ({mode}) failed:\n{r.stderr[-6000:]}"
    with open(out / "result.pkl", "rb") as f:
        result = pickle.load(f)
    with open(out / "counts.json") as f:
        counts = json.load(f)
    return result, counts


def flatten(obj, torch, run_dir=None, path="", out=None):
    """obj as {path: comparable leaf}: tensors as (dtype, shape, stride, bytes), arrays as
    (dtype, shape, bytes); strings with the run's folder in them normalised."""
    import numpy as np

    if out is None:
        out = {}
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        out[path] = ("tensor", type(obj).__name__, str(t.dtype), tuple(t.shape), t.requires_grad,
                     t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        out[path] = ("ndarray", obj.dtype.str, obj.shape, obj.tobytes())
    elif isinstance(obj, dict):
        out[path] = (type(obj).__name__, list(map(repr, obj)))
        for k, v in obj.items():
            flatten(v, torch, run_dir, f"{path}/{k!r}", out)
    elif isinstance(obj, (list, tuple)):
        out[path] = (type(obj).__name__, len(obj))
        for i, v in enumerate(obj):
            flatten(v, torch, run_dir, f"{path}[{i}]", out)
    elif isinstance(obj, str):
        out[path] = obj.replace(run_dir, "<run>") if run_dir else obj
    elif obj is None or isinstance(obj, (bool, int, float, complex, bytes)):
        out[path] = (type(obj).__name__, repr(obj))
    else:  # an object saved whole (TrainingArguments, AttributeDict, ...): its attributes
        out[path] = type(obj).__qualname__
        state = getattr(obj, "__dict__", None)
        if state is not None:
            flatten(dict(state), torch, run_dir, path + ".__dict__", out)
        else:
            out[path] = (type(obj).__qualname__, repr(obj))
    return out


def assert_same(a, b, what):
    missing = sorted(set(a) ^ set(b))
    assert not missing, f"{what}: entries in one only: {missing[:10]}"
    diff = [k for k in a if a[k] != b[k]]
    assert not diff, f"{what}: differ at {diff[:10]}: {a[diff[0]]!r:.300} != {b[diff[0]]!r:.300}"


def checkpoint_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES and p.name != "result.pkl")


@pytest.mark.parametrize("lib", list(JOBS))
def test_library_under_install(lib, tmp_path):
    torch = require_torch()
    require_lib(lib)
    import torchfree.torch as tft

    plain_dir, tf_dir = tmp_path / "plain", tmp_path / "torchfree"
    plain, plain_counts = run_job(lib, "plain", plain_dir)
    got, tf_counts = run_job(lib, "tf", tf_dir)

    # the same results, bit for bit: parameters, optimizer and scheduler states, RNG states
    for key in plain:
        assert_same(flatten(plain[key], torch), flatten(got[key], torch), f"{lib}: {key}")
    # resuming from the checkpoint ends where the uninterrupted run does
    assert_same(flatten(plain["full"], torch), flatten(plain["params"], torch), f"{lib}: resumed vs full (plain)")

    # every call is seen the same in both runs, and only the expected ones fell back to torch
    assert (tf_counts["save"], tf_counts["load"]) == (plain_counts["save"], plain_counts["load"])
    assert tf_counts["save"] > 0 and tf_counts["load"] > 0
    assert tf_counts["fallbacks"] == EXPECTED_FALLBACKS[lib], json.dumps(tf_counts, indent=1)
    saves_fb = sum(n for k, n in tf_counts["fallbacks"].items() if k.startswith("save"))
    loads_fb = sum(n for k, n in tf_counts["fallbacks"].items() if k.startswith("load"))
    print(f"{lib}: torch.save {tf_counts['save']} calls, {tf_counts['save'] - saves_fb} through torchfree, "
          f"{saves_fb} fell back; torch.load {tf_counts['load']} calls, {tf_counts['load'] - loads_fb} through "
          f"torchfree, {loads_fb} fell back")

    # the files: those written under install() read with plain torch.load as the plain run's do, and
    # the plain run's read the same under install()
    files = checkpoint_files(plain_dir)
    assert files and files == checkpoint_files(tf_dir)
    before = collections.Counter(tft._fallbacks)
    for rel in files:
        ref = flatten(torch.load(plain_dir / rel, weights_only=False), torch, str(plain_dir))
        mine = flatten(torch.load(tf_dir / rel, weights_only=False), torch, str(tf_dir))
        assert_same(ref, mine, f"{lib}: {rel} written under install(), read by torch.load")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fallback's one-time warning
            with tft.patched():
                back = flatten(torch.load(plain_dir / rel, weights_only=False), torch, str(plain_dir))
        assert_same(ref, back, f"{lib}: {rel} written by torch, read under install()")
    # weights_only=False here: torchfree's strict load hands an object of a class it does not
    # rebuild (TrainingArguments) to torch's load; everything else it reads itself
    fell = sum((collections.Counter(tft._fallbacks) - before).values())
    assert fell == EXPECTED_READ_FALLBACKS[lib]
    print(f"{lib}: {len(files)} files written by torch read under install(), {fell} handed to torch's load")
