"""Typed, frozen configurations, one per pipeline step.

Each entry point parses its flags into one of these dataclasses, logs it with a single
``mlflow.log_params(asdict(cfg))`` and passes it down. Field names are the MLproject parameter
names and the CLI flag names (``image_size`` <-> ``--image-size``), one to one.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from typing import Any, Mapping

from cxrexp.tags import CHALLENGER, CHAMPION

# The real database's class balance (3,616 COVID vs 10,192 Normal): the synthetic default mimics it.
REAL_PREVALENCE = 3616 / (3616 + 10192)
# The built-in task's difficulty: the opacity strength of the faintest synthetic positive. 0.16, not
# the original 0.04, because main's model could not clear promote's gates honestly at 0.04: chosen on
# the VALIDATION split with benchmarks/builtin_budget.py (val ROC-AUC 0.881 / sens 0.742 at 0.04,
# 0.925 / 0.806 at 0.10, 0.968 / 0.903 / spec 0.966 at 0.16; docs/benchmarks.md).
SYNTHETIC_FAINTEST = 0.16
# main's training budget: early stopping ends the built-in run after ~22 epochs at SYNTHETIC_FAINTEST
# (best validation AUC near epoch 17), well before 40; the old 15 stopped it while still improving.
MAIN_EPOCHS = 40

ENHANCE_METHODS = ("clahe", "gamma", "none")
CLASS_WEIGHT_SCHEMES = ("none", "inverse", "balanced", "effective")
THRESHOLD_RULES = ("specificity", "youden", "sensitivity")
OBJECTIVES = ("roc_auc", "sens_at_spec")
PRUNERS = ("median", "median-average", "percentile", "halving", "hyperband", "none")
# What the classifier sees of each X-ray (docs/lungs.md): the whole image, the lungs' box, or the box
# with everything outside the widened lung mask set to ``lung_fill``.
LUNG_MODES = ("none", "crop", "mask")
LUNG_ASPECTS = ("pad", "stretch")
# How the lung segmenter's 3x3 convolutions are built (lungs/segmenter.py): "separable" (depthwise then
# pointwise) costs about a fifth of the multiply-adds of "standard" (docs/lungs.md, "What a lung view costs").
SEGMENTER_CONVS = ("standard", "separable")

# Decoded images larger than this are refused (decompression bombs): the default of every step that
# decodes (preprocess, the served model, predict).
MAX_PIXELS = 64_000_000
# The outer share of each image side where hospitals burn in text, markers and scanner labels: where the
# synthetic set draws its shortcut marker and what the shortcut audit scores as "border".
BORDER_FRACTION = 0.12
# Fewer usable heatmaps than this and the shortcut audit gives no verdict (not passed): single maps'
# lung focus spans 0-1, so the mean of a handful is noise, and a pass on it would unlock promotion.
MIN_AUDIT_HEATMAPS = 10
# The occlusion check (cxrexp.evaluation.occlusion) widens each lung mask by this share of the image side
# before it hides or shows the lungs. Why so wide: the segmenter misses some consolidated lung and a
# `lungs=mask` view keeps the mask widened by 5 % of the lung box, so a narrower hidden region leaves a
# ring of lung in the "outside". Chosen on the validation split with `mask` models as a positive control
# (they see nothing beyond their widened mask, so with the lungs hidden they must rank at chance); the
# table is in docs/evaluate.md. A lung view with a wider `lung_margin` needs a wider one (evaluate's flag).
OCCLUSION_MARGIN = 0.10
# The classifier's name in the Model Registry, the default of train, evaluate, promote and main.
REGISTERED_MODEL_NAME = "cxr-covid-cnn"
DEFAULT_EXPERIMENT = "cxrexp"  # the MLflow experiment of runs cxrexp starts itself (cli --experiment)
STRATEGIES = ("default", "mirrored")  # TrainConfig.strategy (cxrexp.learn.devices)
# The lung segmenter's name in the Model Registry (segment registers it, preprocess's lung_model reads it).
SEGMENTER_MODEL_NAME = "cxr-lung-seg"
# A segmenter trained on the built-in set's synthetic masks is registered apart: its masks are useless on
# real films, and under SEGMENTER_MODEL_NAME it could become the @champion that real preprocess runs use.
SYNTHETIC_SEGMENTER_NAME = "cxr-lung-seg-synthetic"
DEFAULT_LUNG_MODEL = f"models:/{SEGMENTER_MODEL_NAME}@champion"
# Files left out of training by default: the COVID-19 Radiography Database's paediatric normals (a
# children's hospital with no COVID films: a shortcut of its own). Decided on the external dev pairings
# over three seeds, never on a test split (docs/lungs.md); a name no other dataset uses, so elsewhere it
# excludes nothing. `-P exclude=` (empty) keeps every file.
DEFAULT_EXCLUDE = ("@paediatric-normals",)


def parse_int_list(text: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"32,32,64"`` -> ``(32, 32, 64)``; an empty string gives an empty tuple."""
    if isinstance(text, (tuple, list)):
        return tuple(int(v) for v in text)
    return tuple(int(part) for part in str(text).replace(" ", "").split(",") if part)


def parse_str_list(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"COVID, Normal"`` -> ``("COVID", "Normal")``; keeps spaces inside names (``Viral Pneumonia``)."""
    if isinstance(text, (tuple, list)):
        return tuple(str(v) for v in text)
    return tuple(part.strip() for part in str(text).split(",") if part.strip())


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def flat_fields(cls: type) -> list[tuple[str, Any]]:
    """``(name, default)`` of every flag of a config class: a nested config (``PreprocessConfig.image``)
    contributes its own fields, so flags, MLproject parameters and MLflow params stay one flat set."""
    out: list[tuple[str, Any]] = []
    for f in fields(cls):
        default = _default(f)
        out.extend(flat_fields(type(default)) if is_dataclass(default) else [(f.name, default)])
    return out


def from_flat(cls: type, values: Mapping[str, Any]) -> Any:
    """Build ``cls`` from flat flag values (nested configs are filled from their own field names);
    names not given keep their defaults. Unknown names raise TypeError, bad values ValueError."""
    known = {name for name, _ in flat_fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        default = _default(f)
        if is_dataclass(default):
            kwargs[f.name] = from_flat(type(default), {k: v for k, v in values.items()
                                                       if k in {n for n, _ in flat_fields(type(default))}})
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def flat_params(cfg: Any) -> dict[str, Any]:
    """The config as MLflow params, one per flag: tuples become comma-separated strings (how they are
    passed in), booleans ``true``/``false``, nested configs their own fields."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update(flat_params(value))
            continue
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = str(value).lower()  # as MLproject and the CLI spell it
        out[f.name] = value
    return out


@dataclass(frozen=True)
class ImageSpec:
    """Everything that turns a decoded grey image into what the model sees.

    Stored with every prepared dataset and every model, so the served model applies exactly the
    training preprocessing.
    """

    image_size: int = 128
    enhance: str = "clahe"
    clip_limit: float = 40.0
    tile_grid: int = 8
    gamma: float = 0.8
    # The lung view (cxrexp.lungs.view). ``lung_model`` is the segmenter whose masks make every crop,
    # in training and serving alike; preprocess resolves an alias to the version it used
    # (``models:/cxr-lung-seg/3``), so a prepared dataset and the models trained on it name that version.
    # crop + clip_limit 40 + stretch: the one setting that did well on both external dev pairings, chosen
    # on validation and those pairings over five seeds, never on a test split (docs/lungs.md).
    lungs: str = "crop"
    lung_model: str = DEFAULT_LUNG_MODEL
    lung_margin: float = 0.05  # share of the lung box's own height/width added on each side
    lung_fill: int = 0  # the grey outside the widened mask (lungs=mask) and of the padding (aspect=pad)
    lung_aspect: str = "stretch"

    def __post_init__(self) -> None:
        if self.lungs not in LUNG_MODES:
            raise ValueError(f"lungs={self.lungs!r} is not one of {LUNG_MODES}")
        if self.lung_aspect not in LUNG_ASPECTS:
            raise ValueError(f"lung_aspect={self.lung_aspect!r} is not one of {LUNG_ASPECTS}")
        if not 0 <= self.lung_margin <= 0.5:
            raise ValueError(f"lung_margin={self.lung_margin} must be between 0 and 0.5")
        if not 0 <= self.lung_fill <= 255:
            raise ValueError(f"lung_fill={self.lung_fill} must be a grey level in 0..255")
        if self.lungs != "none" and not self.lung_model:
            raise ValueError(f"lungs={self.lungs} needs a segmenter: -P lung_model=models:/{SEGMENTER_MODEL_NAME}@champion "
                             "(train one with `mlflow run . -e segment`)")
        if self.enhance not in ENHANCE_METHODS:
            raise ValueError(f"enhance={self.enhance!r} is not one of {ENHANCE_METHODS}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size={self.image_size} must be between 16 and 1024 pixels")
        if self.clip_limit <= 0 or self.tile_grid < 1 or self.gamma <= 0:
            raise ValueError(
                f"clip_limit ({self.clip_limit}), tile_grid ({self.tile_grid}) and gamma ({self.gamma}) "
                "must be positive"
            )

    @classmethod
    def from_stored(cls, raw: Mapping[str, Any]) -> "ImageSpec":
        """The spec a prepared dataset or a model stored (``asdict``), read back.

        A field the stored spec lacks takes the value it had when that spec was written, not today's
        default: specs written before lung views existed are whole-image specs (``lungs=none``), and
        the lung defaults that changed since keep their old meaning (``STORED_SPEC_FALLBACKS``).
        Unknown keys raise TypeError.
        """
        return cls(**{**STORED_SPEC_FALLBACKS, **dict(raw)})

    def key_fields(self) -> dict[str, Any]:
        """The fields that decide the pixels, for cache keys: with ``lungs=none`` the lung settings
        change nothing, so they are left out (and keys made before lung views existed still match)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.lungs == "none":
            for name in ("lungs", "lung_model", "lung_margin", "lung_fill", "lung_aspect"):
                values.pop(name)
        return values


# What a stored spec that lacks a field meant (``ImageSpec.from_stored``): the defaults before they
# were changed. Specs from before lung views have no lung fields and are whole-image specs.
STORED_SPEC_FALLBACKS: dict[str, Any] = {"lungs": "none", "lung_aspect": "pad"}


@dataclass(frozen=True)
class PreprocessConfig:
    """Flags of ``preprocess``. ``data_dir=""`` means the built-in synthetic set."""

    data_dir: str = ""
    classes: tuple[str, ...] = ("COVID", "Normal")
    positive_class: str = "COVID"
    # File-name globs left out of every class and listed in skipped.csv: a source known to teach a
    # shortcut, e.g. the database's paediatric normals (docs/lungs.md has the patterns).
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    image: ImageSpec = field(default_factory=ImageSpec)  # flags --image-size, --enhance, --clip-limit, ...
    val_frac: float = 0.1
    test_frac: float = 0.1
    seed: int = 42
    near_dup_distance: int = 48  # bits of the 256-bit perceptual hash
    out_dir: str = ".cxrexp/prepared"
    workers: int = 0
    max_pixels: int = MAX_PIXELS
    synthetic_count: int = 1200
    synthetic_prevalence: float = REAL_PREVALENCE
    synthetic_size: int = 256
    synthetic_shortcut: float = 0.0
    # The built-in task's difficulty: opacity strength of the faintest positive (synthetic.SyntheticSpec).
    synthetic_faintest: float = SYNTHETIC_FAINTEST

    def __post_init__(self) -> None:
        if self.positive_class not in self.classes:
            raise ValueError(
                f"positive_class={self.positive_class!r} is not among classes={list(self.classes)}"
            )
        if len(self.classes) < 2:
            raise ValueError(f"classes={list(self.classes)}: need at least two classes")
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(
                f"val_frac={self.val_frac} and test_frac={self.test_frac} must be in (0, 1) and sum below 1"
            )
        if not 0 <= self.synthetic_shortcut <= 1:
            raise ValueError(f"synthetic_shortcut={self.synthetic_shortcut} must be in [0, 1]")
        if not 0 <= self.synthetic_faintest <= 1:
            raise ValueError(f"synthetic_faintest={self.synthetic_faintest} must be in [0, 1]")

    @classmethod
    def flat(cls, **values: Any) -> "PreprocessConfig":
        """From flag names, the image fields among them: ``PreprocessConfig.flat(image_size=64, seed=1)``."""
        return from_flat(cls, values)


@dataclass(frozen=True)
class TrainConfig:
    """Flags of ``train``. ``data=""`` runs (or reuses) ``segment`` with main's segmenter settings and
    ``preprocess`` with its defaults on the built-in set first, as ``main`` does."""

    data: str = ""
    preset: str = "default"
    filters: tuple[int, ...] = (16, 32, 64, 128)
    dense: tuple[int, ...] = (64,)
    dropout: float = 0.2
    # Off, as published; decided on validation and the external dev pairings, never on test
    # (benchmarks/decide_batch_norm.py: mean val ROC-AUC 0.987 off vs 0.931 on, one seed in three
    # collapsing at epoch 1 with it; docs/benchmarks.md).
    batch_norm: bool = False
    learning_rate: float = 1e-3
    batch_size: int = 32
    epochs: int = 15
    patience: int = 5
    lr_patience: int = 2
    lr_factor: float = 0.5
    class_weight: str = "inverse"
    effective_beta: float = 0.999
    augment: bool = False
    seed: int = 42
    # The operating point: the most sensitive threshold with validation specificity >= target_specificity.
    # Not Youden: a threshold that balances sensitivity and specificity on the database's own validation
    # split called 19-41% of other hospitals' normals COVID; at 0.95 it was 7-13% over five seeds
    # (external dev pairings; docs/lungs.md#the-operating-threshold). target_specificity is also the
    # sens_at_spec objective's.
    threshold_rule: str = "specificity"
    target_sensitivity: float = 0.95
    n_trials: int = 0
    study_name: str = "cxrexp"
    storage: str = ""
    pruner: str = "median"
    objective: str = "roc_auc"
    target_specificity: float = 0.95
    n_jobs: int = 1
    trial_timeout: int = 0
    # Optuna's heartbeat: a running trial records one every `heartbeat` seconds; one silent for
    # `stale_after` seconds belonged to a process that died (SIGKILL, OOM, a lost machine) and is
    # failed and retried by the next trial any worker starts (cxrexp.tuning.stale). 0 turns it off.
    heartbeat: int = 20
    stale_after: int = 120
    # MLflow's system metrics (CPU, memory, disk, network; GPU where there is one) on the train run,
    # a study's parent and every trial: what a team compares when it sizes machines.
    system_metrics: bool = False
    # tf.distribute: "mirrored" trains on every local GPU (one replica on a CPU); batch_size is per
    # replica. mixed_precision: float16 compute on a GPU (ignored on a CPU). cxrexp/learn/devices.py.
    strategy: str = "default"
    mixed_precision: bool = False
    registered_model_name: str = REGISTERED_MODEL_NAME

    def __post_init__(self) -> None:
        if self.class_weight not in CLASS_WEIGHT_SCHEMES:
            raise ValueError(f"class_weight={self.class_weight!r} is not one of {CLASS_WEIGHT_SCHEMES}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold_rule={self.threshold_rule!r} is not one of {THRESHOLD_RULES}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is not one of {OBJECTIVES}")
        if self.pruner not in PRUNERS:
            raise ValueError(f"pruner={self.pruner!r} is not one of {PRUNERS}")
        if not self.filters:
            raise ValueError("filters is empty: give at least one conv block, e.g. 32,64")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {STRATEGIES}")
        if self.heartbeat < 0 or (self.heartbeat and self.stale_after <= 2 * self.heartbeat):
            raise ValueError(f"heartbeat={self.heartbeat} and stale_after={self.stale_after}: the heartbeat is >= 0 "
                             "seconds (0: off) and stale_after more than twice it, so that one late beat of a live "
                             "trial never makes it look dead")


# The published experiment's settings; `preset=seed` switches every default to these.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "seed": {
        "filters": (32, 32, 64, 128, 256),
        "dense": (256, 128),
        "dropout": 0.2,
        "learning_rate": 1e-3,
        "batch_size": 32,
        "epochs": 25,
        "patience": 5,
        "class_weight": "inverse",
    },
}
# Preprocess side of the published experiment (whole 299x299 images, CLAHE clip 40 on an 8x8 grid).
SEED_IMAGE_SPEC = ImageSpec(image_size=299, enhance="clahe", clip_limit=40.0, tile_grid=8, lungs="none")


def apply_preset(cfg: TrainConfig, explicitly_set: set[str]) -> TrainConfig:
    """Replace defaults (not flags the user set) by the preset's values."""
    overrides = {k: v for k, v in PRESETS[cfg.preset].items() if k not in explicitly_set}
    return replace(cfg, **overrides)


@dataclass(frozen=True)
class EvaluateConfig:
    """Flags of ``evaluate``."""

    model_uri: str = f"models:/{REGISTERED_MODEL_NAME}@{CHALLENGER}"
    data: str = ""
    threshold: float = -1.0  # < 0: the threshold stored with the model
    prevalence: float = -1.0  # < 0: only the dataset's own prevalence
    n_bootstrap: int = 1000
    seed: int = 42
    gradcam_per_cell: int = 2
    min_lung_focus: float = 0.5
    # The audit's second gate: lung focus over the mask's area share. 1.0 is an evenly spread heatmap,
    # i.e. chance; on a lung-cut view the masks cover about 60 % of the image, so lung focus alone
    # passes a heatmap that sits on the lungs no more than chance (docs/evaluate.md).
    min_lung_focus_lift: float = 1.0
    min_audit_heatmaps: int = MIN_AUDIT_HEATMAPS
    occlusion_margin: float = OCCLUSION_MARGIN  # the occlusion check's mask widening (share of the side)
    # Segments the test images that have no stored lung mask, for the audit only ("" = never: the
    # geometric prior); a lung-view model's own carried segmenter is used instead when it has one.
    audit_lung_model: str = DEFAULT_LUNG_MODEL
    batch_size: int = 64
    # Collections from other hospitals (class folders, Kaggle or plain layout), each prepared with the
    # model's image settings under external_out_dir and scored at the model's threshold.
    external: tuple[str, ...] = ()
    external_out_dir: str = ".cxrexp/prepared"


@dataclass(frozen=True)
class SegmentConfig:
    """Flags of ``segment``. ``mask_dirs=""`` trains on the built-in synthetic set's lung masks."""

    mask_dirs: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()  # file-name globs kept out, e.g. *_0.png (external normals)
    image_size: int = 128
    epochs: int = 15
    batch_size: int = 8
    learning_rate: float = 1e-3
    patience: int = 4
    base_filters: int = 16
    conv: str = "standard"
    val_frac: float = 0.1
    test_frac: float = 0.15
    seed: int = 42
    max_pixels: int = MAX_PIXELS
    synthetic_count: int = 240
    synthetic_size: int = 256
    # "" names it by what it learnt from: SEGMENTER_MODEL_NAME for real masks, SYNTHETIC_SEGMENTER_NAME
    # for the built-in set's (``model_name``).
    registered_model_name: str = ""

    @property
    def model_name(self) -> str:
        """The Model Registry name this segmenter is registered under."""
        if self.registered_model_name:
            return self.registered_model_name
        return SEGMENTER_MODEL_NAME if self.mask_dirs else SYNTHETIC_SEGMENTER_NAME

    def __post_init__(self) -> None:
        if self.image_size % 16 or not 32 <= self.image_size <= 512:
            raise ValueError(f"image_size={self.image_size} must be a multiple of 16 in [32, 512] (4 poolings)")
        if self.epochs < 1 or self.batch_size < 1 or self.base_filters < 1:
            raise ValueError(f"epochs={self.epochs}, batch_size={self.batch_size} and base_filters="
                             f"{self.base_filters} must be at least 1")
        if not (0 < self.val_frac < 1 and 0 < self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise ValueError(f"val_frac={self.val_frac} and test_frac={self.test_frac} must be in (0, 1) and sum below 1")
        if self.conv not in SEGMENTER_CONVS:
            raise ValueError(f"conv={self.conv!r} must be one of {', '.join(SEGMENTER_CONVS)}")


@dataclass(frozen=True)
class PromoteConfig:
    """Flags of ``promote``."""

    registered_model_name: str = REGISTERED_MODEL_NAME
    challenger_alias: str = CHALLENGER
    champion_alias: str = CHAMPION
    data: str = ""
    min_sensitivity: float = 0.8
    min_specificity: float = 0.8
    min_roc_auc: float = 0.85
    gate_on_ci_low: bool = False
    primary_metric: str = "test_roc_auc"
    margin: float = 0.01
    # The heatmap audit is reported on every decision but not required by default: on validation it
    # refused every lungs=mask model, which sees nothing but its lungs (docs/serving.md, "The occlusion
    # gate"). When required, it must have been judged at least this strictly (a laxer audit fails).
    require_audit: bool = False
    min_lung_focus: float = EvaluateConfig.min_lung_focus
    min_lung_focus_lift: float = EvaluateConfig.min_lung_focus_lift
    # The occlusion gate (promotion.py), the default evidence gate: with only the lungs shown, the test
    # ROC-AUC's paired interval may reach no further below the whole view's than this. 0.08: on the
    # validation split it passes every lungs=mask model (they see only the lungs; lower bounds -0.016 to
    # -0.020) and fails every lungs=none model (-0.158 to -0.169), with the most room to both of the
    # values tried; never chosen on a test split (docs/serving.md, "The occlusion gate").
    require_occlusion: bool = True
    max_lungs_only_loss: float = 0.08
    # The widest mask widening the evaluate run's check may have used (a wider one is laxer).
    max_occlusion_margin: float = OCCLUSION_MARGIN
    # External collections (folders, as evaluate's -P external) whose occlusion check must pass the same
    # rule (gate external_occlusion): the challenger's evaluate run must have scored them (promote runs
    # one that does when it must). Off by default: on the two external dev pairings the default
    # lungs=crop models fail it (docs/serving.md, "The external occlusion gate").
    external: tuple[str, ...] = ()
    # The paired bootstrap of challenger - champion on the same test cases (the champion gate).
    n_bootstrap: int = 2000
    seed: int = 42
    dry_run: bool = False
    rollback: bool = False


@dataclass(frozen=True)
class MainConfig:
    """Flags of ``main``: segment (or the champion segmenter) -> preprocess -> train -> evaluate with these
    settings, each step's own defaults for the rest."""

    data_dir: str = ""
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE  # preprocess's file-name globs left out
    image_size: int = ImageSpec.image_size
    epochs: int = MAIN_EPOCHS
    n_trials: int = TrainConfig.n_trials
    registered_model_name: str = REGISTERED_MODEL_NAME
    # lungs other than none: main first finds its segmenter by lungs.segmenter_choice (mask_dirs, else the
    # built-in set's masks, else the registry's champion, else the data's own masks, else it stops), trains
    # it with these seg_* settings when it must, and preprocesses with that segmenter version.
    lungs: str = ImageSpec.lungs
    mask_dirs: tuple[str, ...] = ()
    # Smaller than segment's own defaults (128 px, 15 epochs) to keep the chain quick: at 128 px the
    # segmenter alone took 10 of the quick start's 13.5 minutes. On the real mask sets a 64 px segmenter
    # reaches held-out Dice 0.948 (128 px: 0.959), and classifiers trained on either's crops were within
    # noise of each other on both external dev pairings (docs/lungs.md).
    seg_image_size: int = 64
    seg_epochs: int = 10

    def segment_config(self, mask_dirs: tuple[str, ...] = ()) -> SegmentConfig:
        """The ``segment`` step main runs (its ``seg_*`` settings) on ``mask_dirs``; empty: the built-in
        set's masks. ``train`` without data and the built-in budget benchmark use the same one, so they
        reuse main's segment run."""
        return SegmentConfig(mask_dirs=tuple(mask_dirs), image_size=self.seg_image_size, epochs=self.seg_epochs)

    def __post_init__(self) -> None:
        if self.lungs not in LUNG_MODES:
            raise ValueError(f"lungs={self.lungs!r} is not one of {LUNG_MODES}")


@dataclass(frozen=True)
class PredictConfig:
    """Flags of ``predict``: score a folder of X-ray images to a CSV."""

    model: str = f"models:/{REGISTERED_MODEL_NAME}@{CHAMPION}"
    folder: str = ""
    output: str = "predictions.csv"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")


@dataclass(frozen=True)
class ServerConfig:
    """Flags of ``server``: one MLflow tracking server for a team (docs/team.md).

    ``backend_store_uri``: where runs and the registry live (PostgreSQL for a team; keep its password
    in PGPASSWORD or ~/.pgpass, not in the URL). ``artifacts_destination``: where the server keeps
    artifacts (a folder, ``s3://bucket/prefix``, ...); clients send and fetch them through the server
    (``mlflow-artifacts:``), so a model logged on one machine loads on any other. ``host`` is loopback
    unless told otherwise; ``basic_auth`` turns on MLflow's ``--app-name basic-auth``.
    """

    backend_store_uri: str = "sqlite:///mlflow.db"
    artifacts_destination: str = "./mlartifacts"
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2
    basic_auth: bool = False
    wait: int = 120  # seconds to wait for the server to answer before giving up

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port} must be in 1..65535")
        if self.workers < 1 or self.wait < 1:
            raise ValueError(f"workers={self.workers} and wait={self.wait} must be at least 1")


def field_names(cls: type) -> list[str]:
    """The flag names of a config class, nested configs flattened (see ``flat_fields``)."""
    return [name for name, _ in flat_fields(cls)]


__all__ = [
    "REAL_PREVALENCE",
    "ImageSpec",
    "PreprocessConfig",
    "TrainConfig",
    "EvaluateConfig",
    "PromoteConfig",
    "MainConfig",
    "SegmentConfig",
    "SEGMENTER_MODEL_NAME",
    "SYNTHETIC_SEGMENTER_NAME",
    "DEFAULT_EXCLUDE",
    "PredictConfig",
    "MAX_PIXELS",
    "BORDER_FRACTION",
    "REGISTERED_MODEL_NAME",
    "PRESETS",
    "SEED_IMAGE_SPEC",
    "apply_preset",
    "flat_fields",
    "flat_params",
    "from_flat",
    "parse_int_list",
    "parse_str_list",
    "field_names",
]
