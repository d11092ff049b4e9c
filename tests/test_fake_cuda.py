"""Device placement without a GPU: the op, k-means, a whole finetuning run (k-means
initialisation, training steps, dead-code revival, periodic evaluation, checkpoints, the final
evaluation and save), evaluation and steered generation, with every tensor on a simulated
accelerator.

CUDA code that creates a tensor on the CPU and mixes it with the model's activations fails at once
on a GPU and passes every CPU test. These tests catch that on a CPU-only machine.

Why not ``FakeTensorMode`` with a fake ``cuda`` device: fake tensors hold no values, so they stop
at the first step that reads one (``.item()``, ``if mask.any()``, k-means' empty clusters, dead-code
revival, generation), and on a CPU-only build the autograd engine aborts the whole process on a
backward pass through ``cuda`` tensors (there is no CUDA device guard to switch to). So the
accelerator here is *simulated*: a tensor subclass that reports the ``meta`` device (which has a
device guard and no data of its own) and computes on a real CPU tensor inside, under a dispatch
mode that refuses what CUDA refuses:

* an op on tensors of two devices, except 0-dim CPU tensors (CUDA kernels take them as scalars),
  CPU index tensors in advanced indexing, and copies between devices;
* a random op on the device with a CPU ``torch.Generator``.

The values are real, so every data-dependent step runs, and results are compared with the CPU's.
The op's Python implementation runs on the simulated tensors too (not as one opaque call), so what
it creates inside is checked, in the forward and the backward pass.

Not covered: branches on ``device.type == "cuda"`` (autocast, fused AdamW, TF32) take their
other branch here; tests/test_cuda.py runs them on a real GPU (``.ci/gpu_check``).
"""

from __future__ import annotations

import contextlib
import json
import time
from types import SimpleNamespace

import pytest
import torch
import transformers.modeling_utils
from safetensors.torch import load_file
from test_training_support import make_material
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from codebook import CodebookModel, CodeRef, Steering, attach_codebooks, ops
from tests.tiny_models import FAMILIES, VOCAB, tiny_base
from training import trainer
from training.config import FinetuneConfig
from training.evaluate import evaluate
from training.kmeans import kmeans, kmeans_init

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DEVICE = torch.device("meta")  # what simulated tensors report
CPU = torch.device("cpu")
aten = torch.ops.aten
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
              aten._index_put_impl_.default}
_COPY_OPS = {aten.copy_.default, aten._to_copy.default}
# Ops whose Python implementation runs on the simulated tensors, so its insides are checked.
_PYTHON_IMPLS = {torch.ops.codebook.topk_codebook.default: ops._forward}


class DeviceTensor(torch.Tensor):
    """A tensor on the simulated device: reports ``meta``, computes on ``inner`` (CPU)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        tensor = torch.Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), storage_offset=inner.storage_offset(),
            dtype=inner.dtype, layout=inner.layout, device=DEVICE, requires_grad=False)
        tensor.inner = inner
        return tensor

    def __repr__(self):
        return f"DeviceTensor({self.inner!r})"

    # Module._apply swaps a subclass parameter for its converted copy (instead of setting .data,
    # which would leave ``inner`` behind) when the subclass can be flattened.
    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return DeviceTensor(inner_tensors["inner"])

    def tolist(self):  # CUDA tensors allow it (a copy to the host)
        return self.inner.tolist()

    def numpy(self, *, force=False):
        raise TypeError("can't convert a device tensor to numpy; use Tensor.cpu() first")

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _device(t: torch.Tensor) -> torch.device:
    return DEVICE if isinstance(t, DeviceTensor) else t.device


def _refuse_real_meta_tensors(func, args, kwargs) -> None:
    # Torch builds some tensors below the dispatcher, on the device directly: e.g. the index
    # tensor of ``t[[1, 2]]`` (a Python list) is a real meta tensor without values.
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor) and t.is_meta:
            raise RuntimeError(f"{func}: a tensor without values reached the simulated device "
                               "(indexing a device tensor with a Python list? index with a "
                               "tensor on the device instead)")


def _common_device(func, args, kwargs) -> torch.device | None:
    """The one device of the tensor arguments, refusing a mix as CUDA does."""
    common = None
    if func in _COPY_OPS:
        return None
    for position, arg in [*enumerate(args), *kwargs.items()]:
        if func in _INDEX_OPS and position == 1:
            continue  # advanced indexing takes CPU indices on any device
        for t in pytree.tree_leaves(arg):
            if not isinstance(t, torch.Tensor):
                continue
            device = _device(t)
            if device.type == "cpu" and t.dim() == 0:
                continue
            if common is not None and device != common:
                raise RuntimeError(f"{func}: Expected all tensors to be on the same device, but "
                                   f"found at least two devices, {common} and {device}!")
            common = device
    return common


def _run(func, args, kwargs):
    if func in _PYTHON_IMPLS:
        with SimulatedDevice():
            return _PYTHON_IMPLS[func](*args, **kwargs)
    _refuse_real_meta_tensors(func, args, kwargs)
    common = _common_device(func, args, kwargs)
    if kwargs.get("device") is not None:
        out_device = torch.device(kwargs["device"])
    elif func in _COPY_OPS:
        out_device = _device(args[0])
    else:
        out_device = common or CPU
    generator = kwargs.get("generator")
    if generator is not None and generator.device.type != out_device.type:
        raise RuntimeError(f"{func}: Expected a '{out_device.type}' device type for generator "
                           f"but found '{generator.device.type}'")
    if out_device.type == DEVICE.type and kwargs.get("device") is not None:
        kwargs = dict(kwargs, device=CPU)
    originals = {}

    def unwrap(x):
        if isinstance(x, torch.Tensor):
            inner = x.inner if isinstance(x, DeviceTensor) else x
            originals[id(inner)] = x
            return inner
        return x

    def wrap(x):
        if not isinstance(x, torch.Tensor):
            return x
        if id(x) in originals:  # an in-place op or out= returns its argument
            return originals[id(x)]
        return DeviceTensor(x) if out_device.type == DEVICE.type else x

    args, kwargs = pytree.tree_map(unwrap, (args, kwargs))
    return pytree.tree_map(wrap, func(*args, **kwargs))


class SimulatedDevice(TorchDispatchMode):
    """Inside: ``device="meta"`` (or ``.to("meta")``) puts a tensor on the simulated device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})

    def __enter__(self):
        # torch.tensor(data, device=...) builds its tensor on the target device below the
        # dispatcher; build it on the CPU and move it, as a dispatched copy.
        self._saved = torch.tensor, torch.as_tensor
        tensor, as_tensor = self._saved

        def new_tensor(data, *, device=None, requires_grad=False, **kwargs):
            t = tensor(data, **kwargs)
            t = t if device is None else t.to(device)
            return t.requires_grad_() if requires_grad else t

        def new_as_tensor(data, dtype=None, device=None):
            if isinstance(data, torch.Tensor):
                return data.to(dtype=dtype or data.dtype, device=device or data.device)
            return new_tensor(data, dtype=dtype, device=device)

        torch.tensor, torch.as_tensor = new_tensor, new_as_tensor
        return super().__enter__()

    def __exit__(self, *exc):
        torch.tensor, torch.as_tensor = self._saved
        return super().__exit__(*exc)


@pytest.fixture
def device(monkeypatch):
    """The simulated device (tensors reach it inside ``with SimulatedDevice():``)."""
    # Hugging Face kernelizes a model for its device when it switches between train and eval;
    # the kernels library knows no "meta" device: it picks kernels as for the CPU here.
    kernelize = transformers.modeling_utils.kernelize

    def kernelize_as_on_cpu(model, *args, **kwargs):
        model._kernels_device = "cpu"
        return kernelize(model, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "kernelize", kernelize_as_on_cpu)
    return DEVICE


def simulated(where: torch.device):
    """The simulation for runs on the device, nothing for runs on the CPU."""
    return SimulatedDevice() if where == DEVICE else contextlib.nullcontext()


def on_device(t: torch.Tensor) -> bool:
    return isinstance(t, DeviceTensor)


# -- the simulation itself ---------------------------------------------------------------------


def test_the_simulated_device_refuses_what_cuda_refuses(device):
    with SimulatedDevice():
        x = torch.arange(6.0).to(device)
        assert on_device(x) and x.device == device
        with pytest.raises(RuntimeError, match="two devices"):
            x + torch.ones(6)
        with pytest.raises(RuntimeError, match="two devices"):
            torch.zeros(3, 2).index_add_(0, torch.tensor([0, 1]).to(device), x.view(3, 2)[:2])
        with pytest.raises(RuntimeError, match="generator"):
            torch.randint(5, (3,), generator=torch.Generator(), device=device)
        with pytest.raises(RuntimeError, match="generator"):
            torch.multinomial(x + 1, 1, generator=torch.Generator())
        with pytest.raises(RuntimeError, match="without values"):
            x[[0, 1]] = 1.0  # works on CUDA; here the list's values never reach the dispatcher
        # What CUDA accepts: CPU scalars, CPU indices, copies, reading values.
        y = x * torch.tensor(2.0) + 1
        assert on_device(y) and y.cpu().tolist() == [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]
        assert y[torch.tensor([0, 5])].tolist() == [1.0, 11.0]
        assert on_device(torch.zeros(2, device=device).copy_(torch.ones(2)))
        assert torch.ones(2).copy_(x[:2]).tolist() == [0.0, 1.0]
        assert y.sum().item() == 36.0 and bool((y > 0).all())
        assert on_device(torch.tensor([1, 2], device=device))
        assert on_device(torch.arange(3, device=device)[:, None] * 4)


# -- the op -------------------------------------------------------------------------------------


@pytest.mark.parametrize("similarity", ops.SIMILARITIES)
@pytest.mark.parametrize("combine", ops.COMBINES)
def test_op_forward_and_backward_on_the_device_equal_the_cpu(device, similarity, combine):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(37, 4, 8, generator=generator)
    codebook = torch.randn(4, 64, 8, generator=generator)
    bias = torch.zeros(4, 64)
    bias[1, 7], bias[2, :5] = float("inf"), -float("inf")
    scale = torch.ones(4, 64).index_fill_(1, torch.tensor([7, 9]), 2.0)
    results = {}
    for where in (CPU, device):
        with simulated(where):
            xd = x.to(where).detach().requires_grad_()
            cbd = codebook.to(where).detach().requires_grad_()
            out, idx = ops.topk_codebook(xd, cbd, 4, bias.to(where), scale.to(where),
                                         similarity, combine, 1.0, 16)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out).to(where)).sum().backward()
            results[where.type] = [t.detach().cpu() for t in (out, idx, xd.grad, cbd.grad)]
            assert all(on_device(t) == (where == device) for t in (out, idx, xd.grad, cbd.grad))
    for a, b in zip(results["cpu"], results[device.type], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -- k-means ------------------------------------------------------------------------------------


@pytest.mark.parametrize("similarity", ops.SIMILARITIES)
@pytest.mark.parametrize("points", [5, 300])  # fewer points than codes, and k-means++
def test_kmeans_on_the_device_gives_the_cpu_centroids(device, similarity, points):
    x = torch.randn(3, points, 8, generator=torch.Generator().manual_seed(1))
    x[:, : points // 3] += 5  # clusters of unequal size: some centroids end up empty
    cpu = kmeans(x, 16, 4, similarity, torch.Generator().manual_seed(2))
    with SimulatedDevice():
        on = kmeans(x.to(device), 16, 4, similarity, torch.Generator().manual_seed(2))
        assert on_device(on)
        on = on.cpu()
    torch.testing.assert_close(on, cpu, rtol=0, atol=0)


@pytest.mark.slow
def test_kmeans_init_of_a_model_on_the_device(device):
    # GPT-2 with codebooks of k=2: the recorded activations agree to rounding (another attention
    # kernel off the CPU), so the centroids too.
    model = attach_codebooks(tiny_base("gpt2"), sites=["attn_heads", "mlp_out"], num_codes=16,
                             k=2)
    reference = attach_codebooks(tiny_base("gpt2"), sites=["attn_heads", "mlp_out"],
                                 num_codes=16, k=2)
    batches = torch.randint(2, VOCAB, (6, 2, 16), generator=torch.Generator().manual_seed(3))
    kmeans_init(reference, batches, 192, 3, seed=0)
    with SimulatedDevice():
        model.to(device)
        kmeans_init(model, batches, 192, 3, seed=0)
        assert all(on_device(layer.codebook) for layer in model.codebook_layers().values())
        model.to(CPU)
    for key, layer in model.codebook_layers().items():
        torch.testing.assert_close(layer.codebook, reference.codebook_layers()[key].codebook,
                                   rtol=1e-4, atol=1e-6)


# -- a whole finetuning run ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    return make_material(tmp_path_factory.mktemp("material"))


def run_config(material, output, **overrides) -> FinetuneConfig:
    options = dict(base=str(material["gpt2"]), data=[str(material["stories"])],
                   output=str(output), block_size=32, batch_size=4, max_steps=4, num_codes=16,
                   k=2, sites=["attn_heads", "mlp_out"], kmeans_tokens=256, kmeans_iters=3,
                   warmup_steps=2, eval_every=2, eval_tokens=256, log_every=2,
                   checkpoint_every=2, dead_code_steps=1, threads=1, progress=False,
                   precision="fp32", lr_base=3e-3, lr_codebook=3e-3)
    return FinetuneConfig(**(options | overrides))


@pytest.mark.slow
def test_finetune_on_the_device_computes_what_the_cpu_run_computes(material, tmp_path, device,
                                                                   monkeypatch):
    # k-means initialisation, training steps with dead-code revival, periodic evaluation, a
    # checkpoint, the final evaluation and save: all with the model on the device.
    def processes_on(where):
        return lambda _: trainer.Processes(0, 1, 0, 1, where)

    monkeypatch.setattr(trainer, "setup_processes", processes_on(CPU))
    on_cpu = trainer.finetune(run_config(material, tmp_path / "cpu"))
    placed = []
    monkeypatch.setattr(trainer, "setup_processes", processes_on(device))
    with SimulatedDevice():
        on_dev = trainer.finetune(
            run_config(material, tmp_path / "device"),
            on_step=lambda step, model: placed.append(all(map(on_device, model.parameters()))))
    assert placed and all(placed), "the model stays on the device"

    # Hugging Face's attention takes another kernel off the CPU (1e-8 apart), so the figures
    # agree to rounding, not bitwise.
    def figures(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("revived_codes"))
                for r in map(json.loads, lines) if "final" not in r]

    cpu_figures, device_figures = figures(on_cpu), figures(on_dev)
    assert [f[0] for f in device_figures] == [f[0] for f in cpu_figures] == [2, 2, 4, 4]
    assert [f[3] for f in device_figures] == [f[3] for f in cpu_figures]
    assert sum(f[3] or 0 for f in device_figures) > 0, "codes were revived"
    assert [f[1:3] for f in device_figures] == [
        tuple(pytest.approx(v, rel=1e-4) if v is not None else None for v in f[1:3])
        for f in cpu_figures]
    for name in ("model.safetensors", "codebooks.safetensors"):
        a, b = load_file(on_cpu / name), load_file(on_dev / name)
        assert a.keys() == b.keys()
        for key in a:
            if key.endswith("code_counts"):
                assert torch.equal(b[key].sum(-1), a[key].sum(-1)), key
            elif key.endswith("codebook"):  # a near tie may pick another code, or revive one
                assert ((b[key] - a[key]).abs() < 1e-4).float().mean() > 0.9, key
            else:
                torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)
    assert json.loads((on_dev / "eval.json").read_text())["loss"] == pytest.approx(
        json.loads((on_cpu / "eval.json").read_text())["loss"], rel=1e-4)
    assert (on_dev / "checkpoints" / "step-00000002").is_dir()


def test_the_logged_loss_of_several_processes_is_reduced_on_the_device(device, monkeypatch):
    def all_reduce(tensor, op=None):  # NCCL reduces only tensors on the GPU
        if not on_device(tensor):
            raise RuntimeError("NCCL: tensors must be CUDA and dense")
        tensor.mul_(2)  # the other process logged the same loss

    monkeypatch.setattr(trainer.dist, "all_reduce", all_reduce)
    procs = trainer.Processes(rank=0, world_size=2, local_rank=0, local_world_size=2,
                              device=device)
    scheduler = SimpleNamespace(get_last_lr=lambda: [1e-3])
    with SimulatedDevice():
        record = trainer._log_record(10, 2.5, None, scheduler, 128, 10, time.perf_counter(),
                                     None, SimpleNamespace(layers={}), 0, procs)
    assert record["loss"] == 2.5


# -- evaluation and steered generation ----------------------------------------------------------


def tiny_model(family: str) -> CodebookModel:
    model = attach_codebooks(tiny_base(family), sites=["attn_heads", "mlp_out"], num_codes=24,
                             k=3)
    torch.manual_seed(1)
    for layer in model.codebook_layers().values():
        layer.codebook.data.normal_()
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_steered_generation_on_the_device_equals_the_cpu(device, family):
    model = tiny_model(family)
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    steerings = [
        Steering([CodeRef(1, "attn_heads", 2, 5)], strength=2.0, positions="generated",
                 block=[CodeRef(0, "mlp_out", 0, 3)]),
        Steering([CodeRef(0, "attn_heads", 1, 4)], mode="replace", positions="prompt"),
    ]
    results = {}
    for where in (CPU, device):
        runs = []
        with simulated(where), torch.no_grad():
            model.to(where)
            for steering, cache in [(steerings[0], True), (steerings[0], False),
                                    (steerings[1], True)]:
                out = model.generate(ids.to(where), attention_mask=torch.ones_like(ids)
                                     .to(where), max_new_tokens=5, do_sample=False,
                                     use_cache=cache, steering=steering)
                assert on_device(out) == (where == device)
                runs.append(out.cpu())
            with model.capture_codes() as captured, model.steer(steerings[0], prompt_length=7):
                model(runs[0].to(where))
            results[where.type] = runs, captured[(1, "attn_heads")][0].cpu()
            model.to(CPU)
    cpu_runs, cpu_codes = results["cpu"]
    device_runs, device_codes = results[device.type]
    assert all(torch.equal(a, b) for a, b in zip(cpu_runs, device_runs, strict=True))
    assert torch.equal(cpu_codes, device_codes)
    assert (device_codes[:, 7:, 2] == 5).any(-1).all(), "forced on every generated position"


def test_evaluate_on_the_device_equals_the_cpu(device, material):
    from training.models import load_base

    base, tokenizer = load_base(str(material["gpt2"]))
    model = attach_codebooks(base, sites=["attn_heads", "mlp_out"], num_codes=16, k=2)
    documents = material["stories"].read_text().split("<|endoftext|>")[:12]
    on_cpu = evaluate(model, tokenizer, documents, block_size=32, batch_size=4)
    with SimulatedDevice():
        model.to(device)
        on_dev = evaluate(model, tokenizer, documents, block_size=32, batch_size=4)

    def close(a, b):  # to rounding: attention takes another kernel off the CPU
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        return a == pytest.approx(b, rel=1e-5)

    assert close(on_dev, on_cpu)
