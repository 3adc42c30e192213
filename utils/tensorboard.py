"""TensorBoard plumbing shared by every script that logs: the writer, the HParams plugin's summaries, the environment
as text, and graph tracing that never breaks a run.

torch.utils.tensorboard (and with it tensorboard) is imported only when a writer is opened, so scripts run without
--tensorboard pay nothing for it. Pictures are matplotlib figures from utils.plots, logged with `add_figure`: the
same figure a PNG is saved from, never a second drawing.
"""

from __future__ import annotations

import contextlib
import io
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from utils.io import markdown_table
from utils.precision import bf16_native, cpu_capability, cpu_model

HPARAM_TYPES = {bool: "DATA_TYPE_BOOL", int: "DATA_TYPE_FLOAT64", float: "DATA_TYPE_FLOAT64", str: "DATA_TYPE_STRING"}


def open_writer(log_dir: str | Path, purge_step: int | None = None):
    """A SummaryWriter on `log_dir`. With `purge_step`, TensorBoard drops every event of this run at that step or
    later written before (what a resumed run repeats), so the curves continue instead of doubling back."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir), purge_step=purge_step)


def logged_values(log_dir: str | Path, keep: Callable[[str], bool]) -> list[tuple[float, int, object]]:
    """(wall time, step, summary value) of every value in `log_dir`'s event files whose tag `keep` accepts, as
    TensorBoard shows them: what a later restart purged (its SessionLog START at step s drops steps >= s) is left out."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    values = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                values = [v for v in values if v[1] < event.step]
            elif event.HasField("summary"):
                values += [(event.wall_time, event.step, value) for value in event.summary.value if keep(value.tag)]
    return values


def add_values(writer, values: list[tuple[float, int, object]]) -> None:
    """Write summary values read by logged_values again (same step, same wall time)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    for wall_time, step, value in values:
        writer.file_writer.add_summary(Summary(value=[value]), global_step=step, walltime=wall_time)


def add_figure(writer, tag: str, fig, step: int = 0) -> None:
    """Log a matplotlib figure as an image, leaving it open (the caller may still save it as a PNG)."""
    writer.add_figure(tag, fig, global_step=step, close=False)


def add_markdown(writer, tag: str, text: str, step: int = 0) -> None:
    """Text plugin entry; TensorBoard renders it as markdown (tables, code blocks)."""
    writer.add_text(tag, text, global_step=step)


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def environment_markdown(device: torch.device, processes: int = 1) -> str:
    """What the run ran on, as a markdown table: torch, CUDA/cuDNN and the GPU, the CPU and its SIMD level."""
    rows = [("device", str(device) + (f" x {processes} processes" if processes > 1 else "")),
            ("torch", str(torch.__version__)), ("python", platform.python_version()), ("platform", platform.platform()),
            ("CPU", cpu_model()), ("CPU capability", cpu_capability()), ("torch threads", str(torch.get_num_threads())),
            ("native bf16", str(bf16_native(device)))]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        rows += [("GPU", torch.cuda.get_device_name(device)), ("compute capability", f"{major}.{minor}"),
                 ("CUDA", str(torch.version.cuda)), ("cuDNN", str(torch.backends.cudnn.version()))]
    return markdown_table(("", "value"), rows)


def add_graph(writer, model: torch.nn.Module, example: torch.Tensor) -> str | None:
    """Trace `model` on one example into the Graphs dashboard, in eval mode (batch-norm statistics untouched) and
    with the RNG state restored. Returns None, or a one-line reason when the model cannot be traced."""
    was_training = model.training
    rng = torch.random.get_rng_state()
    model.eval()
    try:  # quietly: torch prints its own error before raising, and tracing warns
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            # TensorBoard's graph writer is built on torch.jit.trace (deprecated, no torch.export-based writer exists):
            # its FutureWarning and the tracer's notices about Python values frozen into the trace are not actionable
            warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.\w+` is deprecated")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            writer.add_graph(model, example, use_strict_trace=False)
        return None
    except Exception as e:  # tracing fails on data-dependent control flow and on some compiled or exotic modules
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'cannot be traced'}"
    finally:
        model.train(was_training)
        torch.random.set_rng_state(rng)


# ----------------------------------------------------------------------------- HParams plugin


def _hparams_summary(tag: str, plugin_data):
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    summary = Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(plugin_data), tensor=metadata.NULL_TENSOR)
    return summary


def _any_value(kind: type, differs: bool):
    """An HParams domain that records only the value type (and whether TensorBoard lists the hparam first), with no
    value range: TensorBoard's helpers set HParamInfo fields only through a domain."""
    from tensorboard.plugins.hparams import api_pb2, summary_v2

    class AnyValue(summary_v2.Domain):
        dtype = kind

        def sample_uniform(self, rng=None):
            raise NotImplementedError("an unbounded domain has no uniform distribution")

        def update_hparam_info(self, hparam_info) -> None:
            hparam_info.type = api_pb2.DataType.Value(HPARAM_TYPES[kind])
            hparam_info.differs = differs

    return AnyValue()


def experiment_summary(hparam_types: dict[str, type], metrics: dict[str, str], shown: tuple[str, ...] = ()):
    """The HParams experiment: hparam names and types (no value domains, so the summary is the same for every run of
    a log directory and TensorBoard, which reads one run's, lines them all up) and the metric tags to tabulate, the
    first five shown by default. `shown`: the hparams TensorBoard lists first and shows by default (it shows five,
    those marked as differing between runs first)."""
    from tensorboard.plugins.hparams import summary_v2

    return summary_v2.hparams_config_pb(
        hparams=[summary_v2.HParam(name, _any_value(kind, name in shown)) for name, kind in hparam_types.items()],
        metrics=[summary_v2.Metric(tag, display_name=label) for tag, label in metrics.items()])


def session_start_summary(hparams: dict[str, bool | int | float | str], group_name: str):
    """One run's hparam values (bool, number or string, as experiment_summary declares them)."""
    from tensorboard.plugins.hparams import summary_v2

    return summary_v2.hparams_pb(hparams, trial_id=group_name)


def session_end_summary(status: str = "STATUS_SUCCESS"):
    """The run's outcome for the HParams status filter: STATUS_SUCCESS, STATUS_FAILURE or STATUS_ABORTED. Built here:
    TensorBoard's only session_end_pb (hparams.summary, the TF1 API) needs TensorFlow."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(status), end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info))
