"""--precision / --memory_format auto: time a few real training steps of each candidate and train with the fastest.

Why measure instead of a rule: what pays depends on the CPU, the network and the batch. On a CPU with AMX, bf16 +
channels_last runs a ResNet at 56 px about 2x faster than fp32, but a 28 px FashionCNN spends its time outside the
convolutions and gains little or loses; channels_last helps wide convolutions and costs transposes on small ones.
A few steps of the real model at the real batch shape, on a copy (the run's weights, BatchNorm statistics and random
state are untouched), settle it in seconds.

Candidates: on a CPU, float32 and (only where oneDNN has native bf16: AVX-512 BF16 or AMX; elsewhere it is emulated,
several times slower) bfloat16 autocast, each in NCHW and channels_last; on CUDA, fp16 and (where supported) bf16
autocast in channels_last. Explicit flags narrow the set (--precision fp32, --memory_format nchw; the older --fp16,
--amp_dtype and --channels_last mean what they meant). A run too short to repay the probe takes the reference
(float32 NCHW on a CPU: exact float32 maths). --resume, and --config with a run's args.json, keep the choice the run
made, so it repeats exactly.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from utils.distributed import all_reduce_sum, is_distributed, is_main_process
from utils.errors import InputError
from utils.precision import Precision, autocast, cpu_bf16_native, resolve_precision

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "nchw", "channels_last")
AMP_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PROBE_WARMUP, PROBE_STEPS = 1, 2  # per candidate and round: one untimed step (kernel selection, layout), two timed
PROBE_ROUNDS = 2  # the candidates take turns, twice: a slow phase of a shared machine hits different ones each round
# probe only runs at least this many times longer than the probe itself (in training steps): the probe's steps run at
# the candidates' mixed speeds, and at the 1.4-2.7x the probe finds on CPUs with bf16 a run of 4x its steps gains more
# than it costs (break-even near 2x at 1.5x); below that the reference trains without a probe
PROBE_PAYBACK = 4
PROBE_SECONDS = 1.0  # per candidate and round: fewer timed steps when one step is slow


@dataclass(frozen=True)
class Candidate:
    precision: str  # fp32 / bf16 / fp16
    channels_last: bool

    @property
    def name(self) -> str:
        return f"{self.precision}/{'channels_last' if self.channels_last else 'nchw'}"

    def to_precision(self, note: str | None = None) -> Precision:
        return Precision(self.precision != "fp32", AMP_NAMES[self.precision], self.channels_last, note)


def candidates(device: torch.device, precision: str = "auto", memory_format: str = "auto", fp16: bool = False,
               amp_dtype: str = "auto", channels_last: bool = False) -> tuple[list[Candidate], str | None]:
    """The (precision, memory format) pairs the flags leave open, reference first, and a warning line or None."""
    note = None
    if fp16:  # the older switch: mixed precision as --amp_dtype says (bf16 on CPUs, with its float32 fallback)
        old = resolve_precision(device, True, amp_dtype)
        note = old.note
        name = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[old.amp_dtype]
        if precision not in ("auto", name):
            raise InputError(f"--fp16 means {name} autocast here but --precision says {precision}: drop one of them")
        precisions = [name]
    elif precision != "auto":
        precisions = [precision]
        if device.type == "cpu" and precision == "bf16" and not cpu_bf16_native():
            note = "--precision bf16: this CPU has no native bfloat16 (AVX-512 BF16 or AMX): expect it several times slower"
    elif device.type == "cuda":
        precisions = ["fp16", "bf16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    else:
        precisions = ["fp32", "bf16"] if cpu_bf16_native() else ["fp32"]
    if channels_last:
        if memory_format == "nchw":
            raise InputError("--channels_last and --memory_format nchw contradict each other: drop one of them")
        formats = [True]
    elif memory_format != "auto":
        formats = [memory_format == "channels_last"]
    else:
        formats = [True] if device.type == "cuda" else [False, True]
    return [Candidate(p, f) for p in precisions for f in formats], note


def step_seconds(model: nn.Module, cands: list[Candidate], batch_shape: tuple[int, ...], num_classes: int,
                 device: torch.device) -> dict[str, float]:
    """Seconds of one training step (forward, backward, SGD step) of each candidate, on a copy of `model` with a random
    batch of `batch_shape`; the caller's model, its BatchNorm statistics and the random state are untouched. The
    candidates take turns for PROBE_ROUNDS rounds and each gets its fastest timed step: on a shared VM the same step
    measured 131 ms and 258 ms minutes apart (the second vCPU comes and goes), and a median of back-to-back steps of
    one candidate picked bf16/NCHW over a channels_last that trains 1.4x faster. A candidate whose step fails (an
    operation without a kernel for that dtype or layout) gets math.inf."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=0.0)
    loss_fn = nn.CrossEntropyLoss()
    devices = [device.index or 0] if device.type == "cuda" else []
    times: dict[str, list[float]] = {cand.name: [] for cand in cands}
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        x = torch.randn(batch_shape, device=device)
        y = torch.randint(0, num_classes, (batch_shape[0],), device=device)
        for _ in range(PROBE_ROUNDS):
            for cand in cands:
                if times[cand.name] == [math.inf]:
                    continue
                fmt = torch.channels_last if cand.channels_last else torch.contiguous_format
                probe = probe.to(memory_format=fmt)
                xc = x.contiguous(memory_format=fmt)
                spent, n = 0.0, 0
                try:
                    while n < PROBE_WARMUP + PROBE_STEPS and (n <= PROBE_WARMUP or spent < PROBE_SECONDS):
                        start = time.perf_counter()
                        with autocast(device, cand.precision != "fp32", AMP_NAMES[cand.precision]):
                            loss = loss_fn(probe(xc).float(), y)
                        loss.backward()
                        optimizer.step()
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        seconds = time.perf_counter() - start
                        spent += seconds
                        if n >= PROBE_WARMUP:
                            times[cand.name].append(seconds)
                        n += 1
                except (RuntimeError, NotImplementedError):  # not a candidate on this machine; the others still are
                    times[cand.name] = [math.inf]
                optimizer.zero_grad(set_to_none=True)
    out = {name: min(seconds) for name, seconds in times.items()}
    del probe, optimizer
    return out


def choose_precision(model: nn.Module, cands: list[Candidate], note: str | None, *, batch_shape: tuple[int, ...],
                     num_classes: int, device: torch.device, planned_steps: int, recorded: dict | None = None,
                     recorded_by: str = "resume") -> tuple[Precision, dict]:
    """The Precision the run trains with and its record (args.json's `precision_used`): what was chosen and how
    ("flags"; `recorded_by` for a `recorded` choice: "resume", or "replay" of a run's args.json; "short run";
    "probe"), with the probe's step times in ms."""
    record: dict = {}
    names = [c.name for c in cands]
    recorded_name = (f"{recorded.get('precision')}/{recorded.get('memory_format')}" if isinstance(recorded, dict)
                     else None)
    if len(cands) == 1:
        chosen, record["chosen_by"] = cands[0], "flags"
    elif recorded_name in names:  # --resume or a replayed args.json: the run's own choice, so it repeats exactly
        chosen, record["chosen_by"] = cands[names.index(recorded_name)], recorded_by
    elif planned_steps < PROBE_PAYBACK * len(cands) * PROBE_ROUNDS * (PROBE_WARMUP + PROBE_STEPS):
        chosen, record["chosen_by"] = cands[0], f"short run ({planned_steps} steps): the reference, no probe"
    else:
        times = step_seconds(model, cands, batch_shape, num_classes, device)
        fastest = min(range(len(cands)), key=lambda i: times[cands[i].name])
        if is_distributed():  # every process trains with rank 0's choice
            fastest = int(all_reduce_sum([float(fastest) if is_main_process() else 0.0], device)[0])
        chosen, record["chosen_by"] = cands[fastest], "probe"
        record["step_ms"] = {name: round(seconds * 1000, 2) if math.isfinite(seconds) else None  # None: its step failed
                             for name, seconds in times.items()}
    record = {"precision": chosen.precision, "memory_format": "channels_last" if chosen.channels_last else "nchw", **record}
    return chosen.to_precision(note), record


def describe_choice(record: dict) -> str:
    """One line for the start of the run."""
    how = record["chosen_by"]
    if "step_ms" in record:
        how = "fastest of " + ", ".join(f"{name} {ms:.1f} ms" if ms is not None else f"{name} failed"
                                        for name, ms in record["step_ms"].items()) + " per step"
    return f"{record['precision']} {record['memory_format']} ({how})"
