"""The training-run schema: one flat JSON object, the same for a config file and a preset.

Resolution order (later wins): built-in defaults < ``--preset NAME`` (``presets/NAME.json``) <
the config file < ``--set key=value``. Unknown keys and bad values are refused with a
StudioError naming the key, so a typo never silently trains with a default.
"""

from __future__ import annotations

import difflib
import json
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from studio.errors import StudioError

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"

METHODS_HERE = ("lora", "locon", "loha", "lokr", "dora")
METHODS_NEXT = ("ti", "dreambooth-lora", "dreambooth")  # known, implemented by the next issue
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
PRECISIONS = ("no", "fp16", "bf16")
PREDICTIONS = ("auto", "epsilon", "v_prediction")
SAVE_DTYPES = ("fp16", "bf16", "fp32")


@dataclass
class TrainConfig:
    # what to train, on what
    base_model: str = ""
    dataset: str = ""
    method: str = "lora"
    output_dir: str = ""  # the run folder; empty -> <workspace>/runs/<output_name>-<time>
    output_name: str = "adapter"
    # how long
    max_train_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    # images
    resolution: int = 512
    enable_buckets: bool = True
    bucket_step: int = 64
    min_bucket_side: int = 256
    max_bucket_side: int = 0  # 0 -> resolution * 2
    # adapter
    rank: int = 16
    alpha: float = 16.0
    conv_rank: int = 0  # LoCon/LoHa/LoKr conv layers; 0 -> same as rank
    conv_alpha: float = 0.0  # 0 -> same as alpha
    dropout: float = 0.0
    train_unet: bool = True
    train_text_encoder: bool = False
    # optimisation
    learning_rate: float = 1e-4
    unet_lr: float = 0.0  # 0 -> learning_rate
    text_encoder_lr: float = 0.0  # 0 -> learning_rate
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    # diffusion objective
    prediction_type: str = "auto"  # auto -> the base model's scheduler
    min_snr_gamma: float = 0.0  # 0 -> off; 5 is the usual value
    noise_offset: float = 0.0
    prior_loss_weight: float = 1.0  # weight of regularisation images
    # captions
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0  # tags kept in place at the front when shuffling
    clip_skip: int = 1
    # consumer-GPU tuning
    device: str = "auto"
    mixed_precision: str = "fp16"  # no | fp16 | bf16 (ignored on the CPU)
    gradient_checkpointing: bool = True
    cache_latents: bool = True
    cache_text_encoder_outputs: bool = True
    offload_frozen: bool = True  # VAE / text encoders to the CPU once their outputs are cached
    fp8_base: bool = False
    # output
    save_every_n_steps: int = 0
    keep_checkpoints: int = 2
    save_dtype: str = "fp16"
    sample_every_n_steps: int = 0
    sample_prompts: list = field(default_factory=list)
    sample_negative: str = ""
    sample_seed: int = 0
    sample_steps: int = 20
    sample_cfg: float = 7.0
    sample_sampler: str = "Euler a"
    sample_width: int = 0  # 0 -> resolution
    sample_height: int = 0
    # informational (presets)
    description: str = ""
    vram_gb: float = 0.0

    # ---- helpers -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def unet_learning_rate(self) -> float:
        return self.unet_lr or self.learning_rate

    @property
    def te_learning_rate(self) -> float:
        return self.text_encoder_lr or self.learning_rate


_TYPES = {f.name: typing.get_type_hints(TrainConfig)[f.name] for f in fields(TrainConfig)}


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, _TYPES, n=1)
    return f"Did you mean {close[0]!r}?" if close else "See presets/*.json for the known keys."


def _coerce(key: str, value: Any) -> Any:
    """Check (and for strings from ``--set``, convert) one value to the field's type."""
    typ = _TYPES[key]
    bad = StudioError(f"Config key {key!r} must be {_typename(typ)}, not {value!r}.",
                      f"Fix {key!r} in the config (or in --set {key}=...).")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if typ is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad
    if typ is list:
        if isinstance(value, str):  # --set sample_prompts='["a", "b"]' or a single prompt
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = [value]
            value = parsed if isinstance(parsed, list) else [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad
    return value


def _typename(typ) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
            list: "a list of strings"}.get(typ, str(typ))


def _check_values(cfg: TrainConfig) -> None:
    def need(cond: bool, key: str, what: str, fix: str | None = None):
        if not cond:
            raise StudioError(f"Config key {key!r} {what} (got {getattr(cfg, key)!r}).", fix or f"Fix {key!r}.")

    need(cfg.method in METHODS_HERE + METHODS_NEXT, "method", f"must be one of {', '.join(METHODS_HERE + METHODS_NEXT)}")
    need(cfg.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    need(cfg.lr_scheduler in SCHEDULERS, "lr_scheduler", f"must be one of {', '.join(SCHEDULERS)}")
    need(cfg.mixed_precision in PRECISIONS, "mixed_precision", f"must be one of {', '.join(PRECISIONS)}")
    need(cfg.prediction_type in PREDICTIONS, "prediction_type", f"must be one of {', '.join(PREDICTIONS)}")
    need(cfg.save_dtype in SAVE_DTYPES, "save_dtype", f"must be one of {', '.join(SAVE_DTYPES)}")
    need(cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:"), "device",
         "must be auto, cpu, cuda, cuda:N or mps")
    need(cfg.max_train_steps >= 1, "max_train_steps", "must be at least 1")
    need(cfg.batch_size >= 1, "batch_size", "must be at least 1")
    need(cfg.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be at least 1")
    need(cfg.resolution >= 32 and cfg.resolution % 8 == 0, "resolution", "must be a multiple of 8, at least 32")
    need(cfg.bucket_step >= 8 and cfg.bucket_step % 8 == 0, "bucket_step", "must be a multiple of 8")
    need(1 <= cfg.rank <= 1024, "rank", "must be between 1 and 1024")
    need(cfg.alpha > 0, "alpha", "must be above 0", "Use alpha = rank (scale 1) or rank / 2.")
    need(cfg.conv_rank >= 0, "conv_rank", "must be 0 (same as rank) or more")
    need(0 < cfg.learning_rate <= 10, "learning_rate", "must be above 0 and at most 10",
         "Typical values: 1e-4 for AdamW LoRA, 1.0 for Prodigy.")
    need(cfg.unet_lr >= 0, "unet_lr", "must be 0 (use learning_rate) or above")
    need(cfg.text_encoder_lr >= 0, "text_encoder_lr", "must be 0 (use learning_rate) or above")
    need(cfg.lr_warmup_steps >= 0, "lr_warmup_steps", "must be 0 or more")
    need(0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)")
    need(0 <= cfg.caption_dropout <= 1, "caption_dropout", "must be between 0 and 1")
    need(cfg.keep_tokens >= 0, "keep_tokens", "must be 0 or more")
    need(1 <= cfg.clip_skip <= 12, "clip_skip", "must be between 1 and 12")
    need(cfg.min_snr_gamma >= 0, "min_snr_gamma", "must be 0 (off) or above", "5 is the usual value.")
    need(0 <= cfg.noise_offset <= 1, "noise_offset", "must be between 0 and 1", "0.05-0.1 is usual.")
    need(cfg.max_grad_norm >= 0, "max_grad_norm", "must be 0 (off) or above")
    need(cfg.save_every_n_steps >= 0, "save_every_n_steps", "must be 0 (only at the end) or more")
    need(cfg.sample_every_n_steps >= 0, "sample_every_n_steps", "must be 0 (never) or more")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be at least 1")
    need(cfg.train_unet or cfg.train_text_encoder, "train_unet", "and train_text_encoder cannot both be false")
    need(bool(cfg.output_name) and "/" not in cfg.output_name and "\\" not in cfg.output_name, "output_name",
         "must be a plain file name")


def from_dict(raw: dict, base: TrainConfig | None = None, where: str = "config") -> TrainConfig:
    """Apply ``raw`` over ``base`` (default: defaults), refusing unknown keys by name."""
    if not isinstance(raw, dict):
        raise StudioError(f"The {where} must be a JSON object of key: value pairs.", "See presets/*.json for examples.")
    values = (base or TrainConfig()).to_dict()
    for key, value in raw.items():
        if key.startswith("_") or key == "$schema":  # comments
            continue
        if key not in _TYPES:
            raise StudioError(f"Unknown config key {key!r} in the {where}.", _suggest(key))
        values[key] = _coerce(key, value)
    return TrainConfig(**values)


def validate(cfg: TrainConfig, need_inputs: bool = True) -> TrainConfig:
    _check_values(cfg)
    if need_inputs:
        if not cfg.base_model:
            raise StudioError("Config key 'base_model' is empty.", "Set base_model to a model file, folder, hub id or tiny:sd1.")
        if not cfg.dataset:
            raise StudioError("Config key 'dataset' is empty.", "Set dataset to a folder of images with .txt captions.")
        if not Path(cfg.dataset).expanduser().is_dir():
            raise StudioError(f"Config key 'dataset': {cfg.dataset} is not a folder.", "Point dataset at your image folder.")
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise StudioError(f"Unknown preset {name!r}.", f"Known presets: {', '.join(list_presets())}.")
    return _read_json(path, f"preset {name}")


def _read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise StudioError(f"Cannot read the {where} at {path}: {err.strerror or err}", "Check the path.") from err
    except ValueError as err:
        raise StudioError(f"The {where} at {path} is not valid JSON: {err}", "Fix the JSON syntax.") from err


def parse_sets(pairs: list[str] | None) -> dict:
    """``["rank=8", "sample_prompts=[\"a\"]"]`` -> ``{"rank": "8", ...}`` (values coerced later)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise StudioError(f"--set {pair!r} is not key=value.", "Write it as --set rank=8.")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


def resolve_config(config: str | Path | dict | None = None, preset: str | None = None,
                   sets: list[str] | dict | None = None, need_inputs: bool = True) -> TrainConfig:
    """defaults < preset < config (file or dict; a config may name its own ``preset``) < --set."""
    raw = _read_json(Path(config), "config") if isinstance(config, (str, Path)) else dict(config or {})
    if not isinstance(raw, dict):
        raise StudioError("The config must be a JSON object of key: value pairs.", "See presets/*.json for examples.")
    preset = preset or raw.pop("preset", None)
    raw.pop("preset", None)
    cfg = TrainConfig()
    if preset:
        cfg = from_dict(load_preset(preset), cfg, f"preset {preset}")
    cfg = from_dict(raw, cfg, "config")
    extra = sets if isinstance(sets, dict) else parse_sets(sets)
    cfg = from_dict(extra, cfg, "--set options")
    return validate(cfg, need_inputs)
