"""TrainConfig: train.py's flags, parsed once into a frozen value that the training modules read.

Nothing below the scripts takes or changes argparse's parse result: train.py builds one TrainConfig from its parser
(the defaults live there, once) and, where the run itself decides a value (the epoch count a --time_budget fixes,
the pipeline and cache files it used, the TensorBoard directory), makes a new one with `dataclasses.replace`.
`to_dict()` is what args.json and the checkpoints' `args` hold: the flags in --help order, then what the run decided.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# what the run decides itself (not flags): left out of args.json while unset
RUN_FIELDS = ("data_used", "tensorboard_dir", "precision_used")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run's settings (field names are train.py's flag names; see `python train.py --help`)."""

    config: str | None  # the --config file the values came from (YAML recipe or a run's args.json)
    # model
    model: str
    pretrained: bool
    freeze_backbone: bool
    norm_type: str
    img_size: int
    crop_pct: float | None  # None (auto) until the run resolves it (utils.data.datasets.resolve_crop_pct)
    in_channels: int
    small_input: str
    whiten_stem: bool
    # augmentation and regularisation
    augment: str
    random_erasing: float
    random_crop_padding: int
    auto_augment: str
    mixup_alpha: float
    cutmix_alpha: float
    label_smoothing: float
    ema: bool
    ema_decay: float
    # data
    dataset: str | None
    data_root: str
    skip_bad_images: bool
    batch_size: int
    num_workers: int
    val_fraction: float
    class_weights: str
    sampler: str
    # optimisation and schedule
    optimizer: str
    base_lr: float
    sched: str
    min_lr: float
    wp_epoch: int
    weight_decay: float
    momentum: float
    accumulation: int
    clip_grad: float
    # length and evaluation
    max_epoch: int
    start_epoch: int | None
    time_budget: float
    patience: int
    eval_epoch: int
    tta: str
    # precision and speed
    precision: str
    memory_format: str
    fp16: bool
    amp_dtype: str
    channels_last: bool
    data_pipeline: str
    cache: str
    cache_dir: str
    compile: bool
    cuda: bool
    device: str
    seed: int
    # run directory and outputs
    resume: str | None
    init_from: str | None
    path_to_save: str
    name: str | None
    exist_ok: bool
    tensorboard: bool
    log_dir: str
    log_every: int
    quiet: bool
    # decided by the run
    data_used: dict | None = None  # utils.data.loaders.TrainLoaders.record(): the pipeline and cache files read
    tensorboard_dir: str | None = None  # the run's TensorBoard directory, continued by --resume
    precision_used: dict | None = None  # utils.training.precision_choice.choose_precision's record: what trains, and why

    @classmethod
    def flag_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name not in RUN_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """args.json / the checkpoint's `args`: every flag, then the run's own values once they are set."""
        out = asdict(self)
        for key in RUN_FIELDS:
            if out[key] is None:
                del out[key]
        return out

