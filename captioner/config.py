"""Dataclass schemas for every config group, registered in Hydra's ConfigStore.

Each YAML option under ``conf/<group>/`` extends the schema of its group (``defaults: [_schema_]``
is implied by the top-level schema), so a misspelt key or a wrong type fails when the config is
composed. Library code receives these dataclasses (``OmegaConf.to_object``), never a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


class ConfigError(ValueError):
    """An option's value cannot work (a split the data does not have, options that exclude each other)."""


@dataclass
class ShapesConfig:
    """Size and seed of the generated shapes world (used when ``data.name == shapes``)."""

    n_train: int = 8000
    n_val: int = 1000
    n_test: int = 1000
    image_size: int = 64
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 3


@dataclass
class DataConfig:
    """Where the dataset is and how it is batched."""

    name: str = "shapes"
    format: str = "karpathy"  # karpathy | flickr8k | coco
    root: str = MISSING
    annotations: Optional[str] = None  # Karpathy JSON, relative to root
    image_root: Optional[str] = None  # defaults to root
    generate: bool = False  # shapes world: generate under root if missing
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    image_size: int = 224
    min_word_count: int = 5
    max_caption_len: int = 30  # words, without <start>/<end>
    batch_size: int = 64  # images per training batch
    captions_per_image: Optional[int] = None  # captions per image per batch (None: all of them)
    eval_batch_size: int = 128
    num_workers: int = 0
    # training only: mirror each training image left-right with probability 1/2, drawn per epoch (from a feature
    # cache: the features of the mirrored photo, its train_mirrored split); images whose references say "left" or
    # "right" are never mirrored (CaptionGroups)
    hflip: bool = False
    preload: bool = False  # decode every image once into RAM (small datasets)
    features: Optional[str] = None  # a feature cache directory (scripts/prepare_data.py); needs a frozen encoder
    build_features: bool = True  # with data.features: build the cache first if it does not exist yet
    limit_train: Optional[int] = None  # use only the first N images of a split (tests, quick runs)
    limit_val: Optional[int] = None
    limit_test: Optional[int] = None


@dataclass
class EncoderConfig:
    """Which backbone, which weights, which grid, frozen or fine-tuned."""

    name: str = "shapes_cnn"
    weights: Optional[str] = None  # None: random; an enum name (DEFAULT, IMAGENET1K_V1); or a file path
    grid: Optional[int] = None  # adaptive-pool the feature map to grid x grid (None: keep native)
    stage: Optional[str] = None  # which feature map, for backbones that offer several (efficientnet_lite0: last, stage5, ...)
    freeze: bool = True
    # the encoder's arithmetic: fp32 | bf16 (autocast) | native (bf16 where the device multiplies bf16 natively,
    # fp32 elsewhere). Part of a feature cache's spec: bf16 features differ from fp32 ones by a few percent
    precision: str = "fp32"
    channels: int = 128  # shapes_cnn only
    blocks: int = 3  # shapes_cnn only


@dataclass
class ModelConfig:
    """The decoder network: cell, widths, attention type. (How it is trained is ``LossConfig``.)"""

    name: str = "soft"
    attention: str = "soft"  # soft | hard | none (Show and Tell)
    image_input: str = "init"  # init: image sets h_0/c_0; first: image is the input before <start> (attention none only)
    cell: str = "lstm"  # lstm | gru | rnn
    num_layers: int = 1
    embed_dim: int = 256
    hidden_dim: int = 256
    attn_dim: int = 256
    # Width of the attended context: null feeds the D-dim annotation vectors to the cell (the paper);
    # C < D projects them linearly to C once per image (a rank-C factorisation of every weight that
    # reads the context: same model family, (D - C) x (4H + E) fewer multiply-adds per word).
    context_dim: Optional[int] = None
    dropout: float = 0.5  # on h (to the output layer and between layers) and on the deep output's pre-logits
    feature_dropout: float = 0.0  # on the annotation vectors: one mask per image, kept for all its steps (and captions)
    embed_dropout: float = 0.0  # on the word embeddings fed to the cell and the deep output
    beta_gate: bool = True
    deep_output: bool = True
    tie_embeddings: bool = False  # the output layer's weights are the word embeddings (one V x E matrix)
    # What drives the attention: "previous" (the paper) scores the locations with h_{t-1} and feeds the context
    # to the cell; "current" (Lu et al. 2017's spatial attention) runs the cell first on [word; mean context]
    # and scores them with h_t, which has read the current word; the context then enters the output layer only.
    # "topdown" (Anderson et al. 2018; num_layers >= 2): layer 1 is an attention cell reading [word; mean context;
    # the top layer's h_{t-1}] whose h^1_t scores the locations; the language cell above it reads [context; h^1_t].
    query: str = "previous"
    # Where the locations are: "none" (the paper) gives the decoder the grid as a set of L vectors; "sincos" adds
    # a learned linear map of fixed sin/cos codes of each location's grid coordinates to its vector (any square grid)
    positions: str = "none"


@dataclass
class LossConfig:
    """The training objective: per-token NLL (label smoothing), the doubly stochastic penalty, hard attention's REINFORCE."""

    label_smoothing: float = 0.0  # mix eps of a uniform distribution into the NLL targets (as F.cross_entropy)
    doubly_stochastic: float = 1.0  # lambda of the doubly stochastic attention penalty (models with attention)
    # Hard attention (REINFORCE), Xu et al. 2015 eq. (12); not used by soft attention or Show and Tell.
    lambda_r: float = 1.0  # weight of the score-function (REINFORCE) term
    lambda_e: float = 0.01  # weight of the entropy bonus
    soft_mix: float = 0.5  # probability per minibatch of training with the expected (soft) context instead
    soft_epochs: int = 0  # train the first N epochs with the expected context only (soft_mix = 1), then as above
    baseline_decay: float = 0.9  # moving-average baseline b <- decay * b + (1 - decay) * log p(y | s, a)
    hard_samples: int = 1  # location sequences drawn per caption; > 1 uses a leave-one-out baseline
    reward_to_go: bool = False  # score s_t with the log-likelihood of words t.. only (unbiased, less variance)


@dataclass
class OptimConfig:
    """Adam with an LR schedule, gradient clipping by norm."""

    lr: float = 4e-4
    encoder_lr: float = 1e-3  # used when the encoder is fine-tuned
    weight_decay: float = 0.0
    grad_clip: float = 5.0  # max global norm; 0 disables
    scheduler: str = "cosine"  # cosine | step | none
    warmup_steps: int = 0
    step_size: int = 5  # epochs, for scheduler=step
    gamma: float = 0.5
    ema: float = 0.0  # decay of an exponential moving average of the weights used for validation/test (0: off)
    fit_to_budget: bool = False  # after the first epoch, end the cosine where max_minutes will end the stage

    def __post_init__(self) -> None:
        if self.fit_to_budget and self.scheduler != "cosine":
            raise ConfigError(f"optim.fit_to_budget=true fits the cosine schedule to the time budget; "
                              f"optim.scheduler is {self.scheduler!r}")


@dataclass
class DecodeConfig:
    """How captions are produced at validation, evaluation and captioning time."""

    strategy: str = "greedy"  # greedy | sample | beam
    max_len: int = 30
    beam_size: int = 3
    length_penalty: str = "none"  # none | average | gnmt
    alpha: float = 0.7  # GNMT length-penalty exponent
    no_repeat_ngram: int = 0
    n_best: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    hard_attend: str = "expected"  # hard attention at test time: expected | argmax | sample
    allow_unk: bool = False  # false: <unk> is never emitted (every strategy); true: the model's raw choice (analysis)
    block_bad_endings: bool = False  # no caption ends on a, the, of, and, ... (captioner.decoding.constraints.BAD_ENDINGS)


@dataclass
class SCSTConfig:
    """Self-critical sequence training after (or instead of) the cross-entropy stage (``scst.*``).

    Sample ``samples`` captions per image, reward each with CIDEr-D against the image's training
    references (document frequencies from the training split), subtract a baseline and follow
    REINFORCE (Rennie et al. 2017; the ``mean`` baseline is Luo 2020's). Off while ``epochs`` is 0.
    """

    epochs: int = 0  # SCST epochs after the cross-entropy stage (0: no SCST stage)
    samples: int = 5  # captions sampled per image
    baseline: str = "greedy"  # greedy (reward of the greedy caption) | mean (of the image's other samples)
    max_len: int = 16  # words per sampled (and greedy) caption
    temperature: float = 1.0
    dropout: bool = True  # sample with the decoder's dropout on (training mode); false: in eval mode, the test-time policy
    entropy_weight: float = 0.0  # weight of the mean per-step entropy bonus
    include_end: bool = True  # count <end> as a word in the reward (SacreEOS: no reward for fragments)
    bleu4_weight: float = 0.0  # reward = CIDEr-D + weight * BLEU-4
    block_bad_endings: bool = False  # sample only captions that do not end on a, the, of, ...
    normalise: str = "tokens"  # tokens | samples: the loss's denominator
    hard_attend: str = "expected"  # hard attention's context while sampling
    lr: float = 5e-5  # Adam, after warm-up constant (scheduler=none) or decaying (cosine, to 2% over the stage's epochs)
    scheduler: str = "none"  # none | cosine
    fit_to_budget: bool = False  # with cosine: after the first SCST epoch, end the decay where the time budget ends the stage
    encoder_lr: Optional[float] = None  # a fine-tuned encoder's rate in this stage (None: scst.lr, not optim.encoder_lr)
    warmup_steps: int = 0
    batch_size: Optional[int] = None  # images per SCST batch (None: data.batch_size)
    max_minutes: Optional[float] = None  # wall time reserved for the SCST stage (the cross-entropy stage stops earlier)
    val_metric: str = "CIDEr-D"
    patience: int = 3

    def __post_init__(self) -> None:
        if self.baseline not in ("greedy", "mean"):
            raise ConfigError(f"scst.baseline must be greedy or mean, got {self.baseline!r}")
        if self.normalise not in ("tokens", "samples"):
            raise ConfigError(f"scst.normalise must be tokens or samples, got {self.normalise!r}")
        if self.samples < (2 if self.baseline == "mean" else 1):
            raise ConfigError(f"scst.samples must be >= {2 if self.baseline == 'mean' else 1} for baseline "
                              f"{self.baseline!r}, got {self.samples}")
        if self.scheduler not in ("none", "cosine") or (self.fit_to_budget and self.scheduler != "cosine"):
            raise ConfigError(f"scst.scheduler must be none or cosine (fit_to_budget needs cosine); "
                              f"got {self.scheduler!r}, fit_to_budget={self.fit_to_budget}")
        if self.max_len < 1 or self.temperature <= 0:
            raise ConfigError(f"scst.max_len must be >= 1 and scst.temperature > 0; got {self.max_len}, {self.temperature}")


PRECISIONS = ("auto", "native", "bf16", "fp32")  # training steps: see captioner.utils.autocast


@dataclass
class TrainConfig:
    """The training job (``conf/train.yaml``)."""

    data: DataConfig = MISSING
    encoder: EncoderConfig = MISSING
    model: ModelConfig = MISSING
    optim: OptimConfig = MISSING
    decode: DecodeConfig = MISSING
    loss: LossConfig = field(default_factory=LossConfig)
    scst: SCSTConfig = field(default_factory=SCSTConfig)
    task: str = "caption"  # caption | vqa (question answering on the shapes world)
    init_from: Optional[str] = None  # start from this checkpoint's weights (with scst.epochs > 0: skip cross-entropy)
    logger: str = "jsonl"  # jsonl (metrics.jsonl + train_log.jsonl) | tensorboard (the same, plus an events file)
    val_examples: int = 4  # val images whose caption and attention grid are logged each epoch (tensorboard)
    seed: int = 0
    epochs: int = 10
    max_minutes: Optional[float] = None  # stop training after this wall time (then test on the best checkpoint)
    patience: int = 3  # early stopping on the validation metric, in epochs
    val_metric: str = "BLEU-4"
    val_every: int = 1
    device: str = "auto"  # auto | cpu | cuda
    threads: Optional[int] = None  # torch intra-op threads on CPU
    precision: str = "auto"  # training steps: auto (bf16 autocast on CUDA, float32 on CPU) | native (bf16 where the
    # device multiplies bf16 natively: CUDA with bf16, a CPU with AVX512-BF16 or AMX; float32 elsewhere) | bf16 (any device) | fp32
    compile: bool = False  # torch.compile the decoder step (CUDA; no effect on CPU)
    output_dir: str = MISSING
    resume: Optional[str] = None  # a checkpoint path, or "auto" for <output_dir>/last.pt if it exists
    log_every: int = 50
    save_every: int = 0  # also write last.pt every N optimizer steps (0: at epoch ends only)
    progress: bool = True
    localisation: bool = True  # attention localisation on the test split where boxes exist
    test: bool = True
    test_beam_sizes: list[int] = field(default_factory=list)  # also test with these beam sizes ("beam5/BLEU-4", ...)
    test_block_bad_endings: bool = False  # also test the widest test beam with decode.block_bad_endings ("blocked/...")

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


@dataclass
class EvaluateConfig:
    """The evaluation job (``conf/evaluate.yaml``): a checkpoint decoded on a split, or a results file scored."""

    data: DataConfig = MISSING
    decode: DecodeConfig = MISSING
    checkpoint: Optional[str] = None  # decode this checkpoint's captions for data.split ...
    results: Optional[str] = None  # ... or score this COCO-format results file [{"image_id", "caption"}]
    split: str = "test"
    meteor: bool = False  # needs Java and pycocoevalcap
    localisation: bool = True
    html: Optional[str] = None  # also write the split's results page into this directory (worst CIDEr-D first)
    # Against another system: the captions scored here minus this COCO-format results file's (same images), each
    # metric with a paired bootstrap interval over the images (captioner.metrics.compare)
    compare: Optional[str] = None
    bootstrap: int = 1000  # resamples of the images for compare=
    device: str = "auto"
    threads: Optional[int] = None
    output_dir: str = MISSING
    progress: bool = True


# --------------------------------------------------------------------------------------------------
# Visual question answering (task=vqa, experiment=shapes_vqa). The VQA options extend the captioning schemas
# (VQAModelConfig(ModelConfig), VQADataConfig(DataConfig)): a group option of a subclass fills a field typed
# with its base class and keeps the subclass as the node's type, so TrainConfig.model holds either kind and
# a misspelt or mistyped VQA key still fails when the config is composed.
@dataclass
class QuestionsConfig:
    """Which questions are generated from each scene (``data.questions``)."""

    seed: int = 0  # the question stream of image (split, index) is seeded with (seed, split, index)
    per_image: float = 4.0  # expected questions per image, split evenly over the types (count gives at most ~0.6)
    train_per_image: Optional[float] = None  # the training split's (None: per_image); questions are cheaper than images
    types: list[str] = field(default_factory=lambda: ["attribute", "exist", "count", "relation"])  # captioner.data.questions.QUESTION_TYPES
    max_len: int = 20  # words of a question kept


@dataclass
class VQADataConfig(DataConfig):
    """The shapes world with generated questions."""

    questions: QuestionsConfig = field(default_factory=QuestionsConfig)


@dataclass
class VQAModelConfig(ModelConfig):
    """The VQA network (``model=vqa``). The captioning decoder's options it inherits are not used."""

    name: str = "vqa"
    attention: str = "soft"  # soft | none (the mean of the grid)
    question_only: bool = False  # baseline: no image at all
    cell: str = "lstm"  # question RNN: lstm | gru | rnn
    num_layers: int = 1  # 1-4
    embed_dim: int = 64
    hidden_dim: int = 128  # question vector, attention query and context width
    attn_dim: int = 64
    fusion: str = "concat"  # concat | mul (elementwise product after projecting both to fusion_dim)
    fusion_dim: int = 256
    glimpses: int = 2  # 1 or 2 (stacked attention: query_2 = query_1 + context_1)
    mlp_dim: int = 256
    dropout: float = 0.0  # 0.1 cost relation questions 23 points of accuracy (0.758 vs 0.985, seed 0)


def register_configs() -> None:
    """Register the schemas so YAML options can be validated against them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="encoder", name="encoder_schema", node=EncoderConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="decode", name="decode_schema", node=DecodeConfig)
    cs.store(group="model", name="vqa_schema", node=VQAModelConfig)
    cs.store(group="data", name="vqa_data_schema", node=VQADataConfig)


def to_dict(obj: Any) -> dict:
    """A dataclass (or DictConfig) as a plain dict, for checkpoints and JSON."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    if isinstance(obj, DictConfig):
        return OmegaConf.to_container(obj, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    return dict(obj)
