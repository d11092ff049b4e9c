"""Finetuning a base model with codebooks (or without, for the baseline).

Everything is checked before the long work starts: the recipe, the output directory, the data
files, the base model, then the tokenised data. Training is AdamW over **every** trainable
parameter (base and codebooks, in two groups with their own learning rates), with warmup and a
cosine or linear decay, gradient accumulation and gradient clipping. The loss is only the LM loss:
the codebook op's backward pass already adds the reconstruction term.

Multi-process runs use ``torchrun`` (DDP; NCCL on CUDA, gloo on CPU). Data order, dropout and
every other random choice are functions of (seed, step, rank), and checkpoints hold the model,
the optimizer, the scheduler and the code-usage state, so a resumed run computes exactly what an
uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from codebook import CodebookModel, attach_codebooks
from codebook.ops import reconstruction_mse
from training import checkpoint, data, report
from training.code_usage import CodeUsage
from training.config import FinetuneConfig
from training.evaluate import evaluate, language_model_metrics, site_name
from training.kmeans import kmeans_init
from training.models import load_base, reinitialized
from training.publish import check_push_target, push_output


@dataclasses.dataclass
class Processes:
    """This process's place in a (possibly single-process) run."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_processes(device: str) -> Processes:
    """Read torchrun's environment and join the process group (if there is more than one)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    elif device == "cpu":
        chosen = torch.device("cpu")
    else:
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Processes(rank, world_size, local_rank, local_world, chosen)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or ``None`` for plain float32. ``auto`` uses bf16 on CUDA devices that
    support it and on CPUs with native bf16 (AVX512-BF16 or AMX), where it is faster; elsewhere
    bf16 would only be emulated and slower than float32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if native else None


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict]:
    """AdamW groups over every trainable parameter: codebook parameters (codes and their
    LayerNorms; no weight decay), base matrices (weight decay) and the base's vectors (norms and
    biases; no weight decay)."""
    codebook_ids = set()
    if isinstance(model, CodebookModel):
        codebook_ids = {id(p) for p in model.codebooks.parameters()}
    codebook, decay, no_decay = [], [], []
    for param in model.parameters():  # each shared (tied) parameter once
        if not param.requires_grad:
            continue
        if id(param) in codebook_ids:
            codebook.append(param)
        elif param.dim() >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [
        {"params": decay, "lr": config.lr_base, "weight_decay": config.weight_decay},
        {"params": no_decay, "lr": config.lr_base, "weight_decay": 0.0},
        {"params": codebook, "lr": config.lr_codebook, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _seed_step(seed: int, step: int, rank: int) -> None:
    # Reseeding every step from (seed, step, rank) makes dropout and dead-code revival depend
    # only on where the run is, so a resumed run draws exactly the numbers it would have drawn.
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


@dataclasses.dataclass
class PreparedData:
    train_blocks: torch.Tensor  # [n, block_size + 1]
    val_documents: list[str]
    val_blocks: list[torch.Tensor]  # for periodic evaluation
    stats: dict


def read_split(config: FinetuneConfig) -> tuple[list[str], list[str]]:
    """Training and validation documents (validation held out by document)."""
    documents = data.read_documents(config.data, config.data_format, config.text_column)
    if config.val_data:
        val = data.read_documents(config.val_data, config.data_format, config.text_column)
        return documents, val
    return data.split_validation(documents, config.val_fraction, config.seed)


def prepare_data(config: FinetuneConfig, train_docs: list[str], val_docs: list[str],
                 tokenizer) -> PreparedData:
    train = data.tokenize(train_docs, tokenizer)
    blocks = data.pack_blocks(train.tokens, config.block_size)
    if len(blocks) == 0:
        raise ValueError(
            f"the training data has {train.tokens.numel()} tokens, too few for one block of "
            f"--block-size {config.block_size} (+1): give more text or a smaller block size"
        )
    val = data.tokenize(val_docs, tokenizer)
    val_blocks = data.eval_blocks(val.tokens, config.block_size)
    if not val_blocks:
        raise ValueError("the validation text has fewer than 2 tokens")
    periodic = val_blocks[: max(1, config.eval_tokens // config.block_size)]
    stats = {"train_documents": len(train_docs), "train_tokens": train.tokens.numel(),
             "train_blocks": len(blocks), "val_documents": len(val_docs),
             "val_tokens": val.tokens.numel(), "val_bytes": val.num_bytes}
    return PreparedData(blocks, val_docs, periodic, stats)


class _ReconstructionProbe:
    """Per-site reconstruction MSE of the current step's forward passes, for the log."""

    def __init__(self, layers: dict):
        self.active = False
        self.sums: dict[str, list[float]] = {}
        self._handles = [layer.register_forward_hook(self._hook(site_name(key), layer))
                         for key, layer in layers.items()]

    def _hook(self, name, layer):
        @torch.no_grad()
        def hook(module, args, output):
            if self.active:
                h = layer.normalize(args[0].reshape(*args[0].shape[:-1], layer.groups, layer.dim))
                mse = reconstruction_mse(h, output.reshape(h.shape))
                self.sums.setdefault(name, []).append(mse.item())

        return hook

    def take(self) -> dict[str, float]:
        means = {name: sum(v) / len(v) for name, v in self.sums.items()}
        self.sums = {}
        return means


def _check_output(config: FinetuneConfig) -> Path | None:
    """The checkpoint to resume from (``None``: a fresh run), after checking that the output
    directory is in the state the flags say it is."""
    ckpt_dir = config.checkpoint_path
    latest = checkpoint.latest_checkpoint(ckpt_dir)
    if config.resume:
        if latest is None:
            raise FileNotFoundError(f"--resume: there is no checkpoint in {ckpt_dir} to resume")
        saved = FinetuneConfig(**checkpoint.read_state(latest)["config"])
        differences = config.recipe_differences(saved)
        if differences:
            raise ValueError(f"--resume: the recipe differs from the checkpoint's in "
                             f"{differences}; resume with the original options")
        return latest
    if latest is not None:
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints of a run: pass --resume to "
                              "continue it, or choose another --output / --checkpoint-dir")
    return None


def finetune(config: FinetuneConfig, command: str | None = None,
             on_step: Callable[[int, nn.Module], None] | None = None) -> Path:
    """Run ``config``; returns the output directory (written by process 0).

    ``on_step(step, model)`` is called as training starts (``step`` 0, or the step resumed
    from) and after every optimizer step (``step`` counts from 1).
    ``command`` is the command line recorded in the model card.
    """
    procs = setup_processes(config.device)
    try:
        return _finetune(config, procs, command, on_step)
    finally:
        if procs.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _finetune(config, procs: Processes, command, on_step) -> Path:
    # -- checks, cheapest first -------------------------------------------------------------
    resume_from = _check_output(config)
    if config.push_to_hub and procs.is_main:
        check_push_target(config.push_to_hub)
    train_docs, val_docs = read_split(config)
    torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1)
                                                // procs.local_world_size))
    torch.manual_seed(config.seed)
    base, tokenizer = load_base(config.base)
    if config.reinit_base:
        base = reinitialized(base)
    prepared = prepare_data(config, train_docs, val_docs, tokenizer)

    # -- model, optimizer, schedule ---------------------------------------------------------
    if config.codebooks:
        model = attach_codebooks(base, config.codebook_config(), tokenizer=tokenizer)
    else:
        model = base
    model.to(procs.device).train()
    global_batch = procs.world_size * config.batch_size * config.grad_accum
    total_steps = config.max_steps or math.ceil(
        config.epochs * len(prepared.train_blocks) / global_batch)
    optimizer = torch.optim.AdamW(parameter_groups(model, config), betas=(0.9, 0.95),
                                  fused=procs.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, config.warmup_steps, total_steps, config.schedule, config.min_lr_ratio))
    if procs.device.type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    amp_dtype = autocast_dtype(config.precision, procs.device)

    start_step, state = 0, {}
    layers = model.codebook_layers() if config.codebooks else {}
    if resume_from is not None:
        state, usage_state = checkpoint.load_checkpoint(resume_from, model, optimizer, scheduler)
        start_step = state["step"]
    elif config.codebooks and config.kmeans_init:
        order = torch.randperm(len(prepared.train_blocks),
                               generator=torch.Generator().manual_seed(config.seed))
        needed = math.ceil(config.kmeans_tokens / config.block_size)
        chosen = prepared.train_blocks[order[:needed], :-1]
        kmeans_init(model, chosen.split(config.batch_size), config.kmeans_tokens,
                    config.kmeans_iters, config.seed)
    # The op adds the reconstruction gradient to the incoming gradient without the loss's
    # 1/grad_accum scaling; dividing lambda the same way keeps the objective "LM loss + lambda *
    # reconstruction MSE" of the whole batch, however it is split into micro-steps.
    for layer in layers.values():
        layer.reconstruction_weight = config.reconstruction_weight / config.grad_accum
    usage = CodeUsage(layers, config.dead_code_steps)
    if resume_from is not None and layers:
        usage.load_state_tensors(usage_state)
    probe = _ReconstructionProbe(layers)

    output = Path(config.output)
    if procs.is_main:
        output.mkdir(parents=True, exist_ok=True)
        config.save(output)
    log = report.MetricsLog(output / report.METRICS_FILE,
                            resume_step=start_step) if procs.is_main else None

    trained = model
    if procs.distributed:
        # code_counts are buffers: never broadcast them (CodeUsage sums them across processes).
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[procs.local_rank] if procs.device.type == "cuda" else None,
            broadcast_buffers=False)

    # -- training ---------------------------------------------------------------------------
    tokens_per_step = global_batch * config.block_size
    bar = tqdm(total=total_steps, initial=start_step, desc="finetune", unit="step",
               disable=not (procs.is_main and config.progress), dynamic_ncols=True)
    train_seconds = state.get("train_seconds", 0.0)
    window_start, window_steps = time.perf_counter(), 0
    # Summed on the device and read only when logged: no host sync per step on CUDA.
    window_loss = torch.zeros((), device=procs.device)
    if on_step is not None:
        on_step(start_step, model)
    for step in range(start_step, total_steps):
        _seed_step(config.seed, step, procs.rank)
        step_start = time.perf_counter()
        log_step = (step + 1) % config.log_every == 0
        probe.active = log_step
        for micro in range(config.grad_accum):
            indices = data.sample_indices(step, micro, procs.rank, procs.world_size,
                                          config.batch_size, config.grad_accum,
                                          len(prepared.train_blocks), config.seed)
            batch = prepared.train_blocks[indices].to(procs.device)
            last_micro = micro == config.grad_accum - 1
            sync = (trained.no_sync() if procs.distributed and not last_micro
                    else contextlib.nullcontext())
            with sync:
                with (torch.autocast(procs.device.type, dtype=amp_dtype) if amp_dtype
                      else contextlib.nullcontext()):
                    logits = trained(input_ids=batch[:, :-1]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
                (loss / config.grad_accum).backward()
            window_loss += loss.detach() / config.grad_accum
        probe.active = False
        grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                     if config.grad_clip else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        revived = usage.after_step(step + 1, optimizer) if layers else 0
        train_seconds += time.perf_counter() - step_start
        window_steps += 1
        done = step + 1

        if log_step:
            record = _log_record(done, window_loss.item() / window_steps, grad_norm, scheduler,
                                 tokens_per_step, window_steps, window_start, probe, usage,
                                 revived, procs)
            window_start, window_steps = time.perf_counter(), 0
            window_loss.zero_()
            if procs.is_main:
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}",
                                tok_s=f"{record['tokens_per_second']:,.0f}")
        if procs.is_main and config.eval_every and done % config.eval_every == 0:
            model.eval()  # no dropout, no code counting
            val = language_model_metrics(model, prepared.val_blocks, config.batch_size,
                                         autocast_dtype=amp_dtype)
            model.train()
            log.write({"step": done, "val_loss": val["loss"], "val_accuracy": val["accuracy"]})
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < total_steps:
            if procs.is_main:
                checkpoint.save_checkpoint(
                    config.checkpoint_path, done, model, optimizer, scheduler,
                    usage.state_tensors(), {"config": config.to_dict(),
                                            "train_seconds": train_seconds},
                    config.keep_checkpoints)
        bar.update(1)
        if on_step is not None:
            on_step(done, model)
    bar.close()
    usage.remove_hooks()
    for layer in layers.values():
        layer.reconstruction_weight = config.reconstruction_weight
    if procs.distributed:
        _check_in_sync(model)

    # -- final evaluation and outputs (process 0) --------------------------------------------
    if procs.is_main:
        _finish(config, model, tokenizer, prepared, output, log, command, amp_dtype, {
            "base_parameters": sum(p.numel() for p in base.parameters()),
            "steps": total_steps, "tokens_per_step": tokens_per_step,
            "epochs": total_steps * global_batch / len(prepared.train_blocks),
            "train_seconds": train_seconds,
            "tokens_per_second": (total_steps - start_step) * tokens_per_step / max(
                train_seconds - state.get("train_seconds", 0.0), 1e-9),
            "device": procs.device.type, "processes": procs.world_size,
            "data": prepared.stats,
        })
    if procs.distributed:
        dist.barrier()
    return output


def _log_record(step, loss, grad_norm, scheduler, tokens_per_step, window_steps, window_start,
                probe, usage, revived, procs) -> dict:
    if procs.distributed:  # the logged loss is the global batch's (NCCL reduces GPU tensors)
        value = torch.tensor([loss], dtype=torch.float64, device=procs.device)
        dist.all_reduce(value)
        loss = float(value) / procs.world_size
    seconds = time.perf_counter() - window_start
    record = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
              "tokens_per_second": window_steps * tokens_per_step / max(seconds, 1e-9)}
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    if usage.layers:
        record["reconstruction_mse"] = probe.take()
        record["dead_fraction"] = {site_name(k): v for k, v in usage.dead_fraction(step).items()}
        record["revived_codes"] = revived
    return record


def _check_in_sync(model: nn.Module) -> None:
    """Raise if the processes' weights differ (they must be identical after every step)."""
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(f"the processes' weights diverged (checksums {low} .. {high})")


def _finish(config, model, tokenizer, prepared, output: Path, log, command, amp_dtype,
            summary: dict) -> None:
    model.eval()
    evaluation = evaluate(model, tokenizer, prepared.val_documents, config.block_size,
                          config.batch_size, amp_dtype, progress=config.progress)
    if isinstance(model, CodebookModel):
        model.save_pretrained(output)
    else:
        model.save_pretrained(output, safe_serialization=True)
        tokenizer.save_pretrained(output)
    (output / report.EVAL_FILE).write_text(json.dumps(evaluation, indent=2) + "\n")
    log.write({"step": summary["steps"], "final": {k: evaluation[k] for k in (
        "loss", "bits_per_byte", "accuracy")}})
    plots = [report.LOSS_PLOT]
    drawn = report.plot_losses(log.records(), output / report.LOSS_PLOT)
    if isinstance(model, CodebookModel):
        counts = {site_name(k): layer.code_counts.cpu()
                  for k, layer in model.codebook_layers().items()}
        plots.append(report.USAGE_PLOT)
        drawn = report.plot_code_usage(counts, output / report.USAGE_PLOT) and drawn
    if not drawn:
        print(report.NO_MATPLOTLIB_NOTE.format(plots=", ".join(plots)), file=sys.stderr)
    summary["command"] = command or config.command_line()
    (output / report.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    report.write_model_card(output, config.card_notes)
    if config.push_to_hub:
        push_output(output, config.push_to_hub)
