"""`load_model(spec)`: a MultimodalCoconut, its tokenizer and its image processor.

Specs:
- ``"tiny"``: a tiny random InternVL (Qwen2 text side) and a tokenizer built in code. CPU-friendly,
  deterministic with ``seed``. ``model_overrides`` changes its sizes (see `TinyModelConfig`).
- ``"internvl3-1b-geometry"``, ``"internvl3-2b-geometry"``, ``"internvl3-8b-geometry"``: the published
  InternVL3-1B/2B/8B sizes (`GEOMETRIES`) with random weights, for GPU benchmarks. They are built on the meta
  device and materialised directly on the target device, so an 8B model never occupies host memory.
- a local directory with an InternVL3 checkpoint in the transformers format (e.g. InternVL3-1B-hf, or an
  export written by the trainer). Nothing is ever downloaded.

Every spec gets the three latent tokens; new embedding rows (and untied lm_head rows) start as a copy of an
existing token's row, as the original CoCoNuT does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.data.images import ImageProcessor, checkpoint_max_tiles, load_hf_image_processor, make_hf_image_processor
from engine.model.coconut import MultimodalCoconut, check_attention_backend
from engine.model.tiny_tokenizer import build_tiny_tokenizer
from engine.utils.io import atomic_directory
from engine.utils.logging import first_line, get_logger
from engine.vocab import IMAGE_CONTEXT_TOKEN, LATENT_TOKENS

log = get_logger("model")

@dataclass(frozen=True)
class Geometry:
    """The language-model sizes of one published InternVL3 model. Every InternVL3 up to 14B pairs its Qwen2.5
    language model with the same vision tower (InternViT-300M-448px-V2_5, `INTERNVIT_300M`) and the same MLP
    projector shape (LayerNorm(4096) -> Linear(4096, hidden) -> GELU -> Linear(hidden, hidden))."""

    language_model: str  # the Qwen2.5 model whose published config.json the sizes below come from
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    # InternVL3 keeps a separate lm_head even where the Qwen2.5 base ties it (its published totals count it:
    # 0.938B / 2.09B / 7.94B parameters, see tests/test_geometries.py)
    tie_word_embeddings: bool = False


# Published configs (Qwen2.5-*/config.json, OpenGVLab/InternVL3-*/config.json): every one has q/k/v biases (Qwen2
# attention), rope_theta 1e6, rms_norm_eps 1e-6, and InternVL3's vocabulary of 151,674 tokens.
GEOMETRIES: dict[str, Geometry] = {
    "internvl3-1b-geometry": Geometry("Qwen2.5-0.5B", 896, 24, 14, 2, 4864),
    "internvl3-2b-geometry": Geometry("Qwen2.5-1.5B", 1536, 28, 12, 2, 8960),
    "internvl3-8b-geometry": Geometry("Qwen2.5-7B", 3584, 28, 28, 4, 18944),
}
INTERNVL3_VOCAB_SIZE = 151674
# InternViT-300M-448px-V2_5: 1024 wide, 24 layers, 16 heads, q/k/v biases (qkv_bias in its config), layer scale
INTERNVIT_300M = dict(
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    image_size=448,
    patch_size=14,
    layer_scale_init_value=0.1,
    norm_type="layer_norm",
    attention_bias=True,
)

BUILTIN_SPECS = ("tiny", *GEOMETRIES)


class CheckpointError(ValueError):
    """A model directory that is missing or not an InternVL checkpoint; the message names the path."""


@dataclass
class TinyModelConfig:
    """Sizes of the tiny random InternVL. The defaults keep a CPU forward in milliseconds."""

    text_hidden_size: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    image_size: int = 224
    patch_size: int = 28  # 8x8 patches -> 4x4 = 16 image tokens per tile after pixel shuffle
    tokenizer_vocab_size: int = 512
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = True  # False: a separate lm_head, as the InternVL3 checkpoints have

    def __post_init__(self):
        """Sizes the model can be built with, checked here rather than in transformers or the first forward."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "tie_word_embeddings":
                if not isinstance(value, bool):
                    raise ValueError(f"tiny model: tie_word_embeddings must be true or false, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"tiny model: {f.name} must be an integer >= 1, got {value!r}")
        pairs = (("text_hidden_size", "text_heads"), ("text_heads", "text_kv_heads"),
                 ("vision_hidden_size", "vision_heads"), ("image_size", "patch_size"))  # fmt: skip
        for whole, part in pairs:
            if getattr(self, whole) % getattr(self, part):
                raise ValueError(f"tiny model: {whole} ({getattr(self, whole)}) must be a multiple of {part} "
                                 f"({getattr(self, part)})")  # fmt: skip
        if (self.text_hidden_size // self.text_heads) % 2:
            raise ValueError(f"tiny model: the text head width text_hidden_size / text_heads = "
                             f"{self.text_hidden_size // self.text_heads} must be even (rotary embedding)")  # fmt: skip
        if (self.image_size // self.patch_size) % 2:
            raise ValueError(f"tiny model: image_size / patch_size = {self.image_size // self.patch_size} patches per "
                             "side must be even (the 2x2 pixel shuffle)")  # fmt: skip

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None) -> "TinyModelConfig":
        overrides = dict(overrides or {})
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown tiny model override(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**overrides)


def tiny_internvl_config(tokenizer, cfg: TinyModelConfig):
    from transformers import InternVLConfig

    return InternVLConfig(
        vision_config=dict(
            hidden_size=cfg.vision_hidden_size,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            intermediate_size=cfg.vision_intermediate_size,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=cfg.text_hidden_size,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            num_key_value_heads=cfg.text_kv_heads,
            intermediate_size=cfg.text_intermediate_size,
            vocab_size=len(tokenizer),
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=cfg.tie_word_embeddings,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN),
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2 // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=cfg.tie_word_embeddings,  # InternVLForConditionalGeneration ties on this one
    )


def internvl3_geometry_config(spec: str, tokenizer):
    """The InternVLConfig of a built-in geometry (`GEOMETRIES`); the image token id comes from our tokenizer.

    The published llm_configs also carry a dynamic-NTK rope scaling (factor 2) that only changes the rotary
    frequencies beyond max_position_embeddings (32,768 positions): it is left out, which changes nothing below that
    (the fast paths run a checkpoint that has it as its default rope there: `layers.rotary_cos_sin`).
    """
    from transformers import InternVLConfig

    if spec not in GEOMETRIES:
        raise ValueError(f"unknown InternVL3 geometry {spec!r}; valid: {sorted(GEOMETRIES)}")
    g = GEOMETRIES[spec]
    return InternVLConfig(
        vision_config=dict(INTERNVIT_300M),
        text_config=dict(
            model_type="qwen2",
            hidden_size=g.hidden_size,
            num_hidden_layers=g.num_hidden_layers,
            num_attention_heads=g.num_attention_heads,
            num_key_value_heads=g.num_key_value_heads,
            intermediate_size=g.intermediate_size,
            vocab_size=INTERNVL3_VOCAB_SIZE,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=g.tie_word_embeddings,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN),
        image_seq_length=256,
        downsample_ratio=0.5,
        tie_word_embeddings=g.tie_word_embeddings,
    )


def internvl3_1b_geometry_config(tokenizer):
    """InternVL3-1B: InternViT-300M + Qwen2.5-0.5B (896 wide, 24 layers, 14 query / 2 KV heads, head_dim 64)."""
    return internvl3_geometry_config("internvl3-1b-geometry", tokenizer)


def builtin_config(spec: str, model_overrides: dict[str, Any] | None = None):
    """(config, tokenizer) of a built-in spec, without building the model."""
    if spec == "tiny":
        tiny = TinyModelConfig.from_overrides(model_overrides)
        tokenizer = build_tiny_tokenizer(tiny.tokenizer_vocab_size)
        return tiny_internvl_config(tokenizer, tiny), tokenizer
    if model_overrides:
        raise ValueError(f"model_overrides apply to the 'tiny' spec only, got {model_overrides}")
    tokenizer = build_tiny_tokenizer()
    return internvl3_geometry_config(spec, tokenizer), tokenizer


def build_random_base(config, *, device: str | torch.device, seed: int, on_meta_first: bool):
    """A randomly initialised `InternVLForConditionalGeneration` (fp32) on `device`.

    `on_meta_first`: build the modules on the meta device (no memory anywhere), allocate them directly on `device`
    (`to_empty`) and run the model's own initialisation there (`init_weights`: transformers' `_init_weights` for
    every module, rotary buffers included, then the lm_head tie). An 8B model then never exists in host memory;
    the values differ from a host build with the same seed (another RNG stream) but follow the same
    distributions. Otherwise the model is built on the host as transformers does and moved to `device`.
    """
    from transformers import InternVLForConditionalGeneration

    device = torch.device(device)
    if not on_meta_first:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            base = InternVLForConditionalGeneration(config)
        return base.to(device)
    with torch.device("meta"):
        base = InternVLForConditionalGeneration(config)  # transformers skips the initialisation on meta
    if device.type == "meta":
        return base
    base.to_empty(device=device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"):
        torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
        base.init_weights()
    # to_empty gives every parameter its own new storage: the tie must be in place again (init_weights ties)
    tied = bool(getattr(base.config, "tie_word_embeddings", False))
    head, embed = base.get_output_embeddings().weight, base.get_input_embeddings().weight
    if (head is embed) != tied:
        raise RuntimeError(f"lm_head tie lost while materialising (tie_word_embeddings={tied})")
    return base


def add_latent_tokens(base, tokenizer, init_token: str | None = "<<") -> tuple[int, int, int]:
    """Add the latent markers to the tokenizer, grow the embeddings and initialise the new rows.

    New rows copy the embedding (and, when untied, the lm_head row) of `init_token` (the original CoCoNuT
    uses "<<"); when that token is not a single known token, the eos token's row is used. Tokens that are
    already present (an exported checkpoint) are left as they are.
    """
    missing = [t for t in LATENT_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(list(missing), special_tokens=True)
    ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS)
    embeddings = base.get_input_embeddings()
    # a tokenizer that has the tokens already, beside weights without their rows, gets the rows as new tokens do
    uncovered = [t for t, i in zip(LATENT_TOKENS, ids) if i >= embeddings.num_embeddings and t not in missing]
    missing += uncovered
    if not missing:
        return ids  # type: ignore[return-value]

    if len(tokenizer) > embeddings.num_embeddings:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    source_id = None
    if init_token is not None:
        enc = tokenizer.encode(init_token, add_special_tokens=False)
        if len(enc) == 1:
            source_id = enc[0]
    if source_id is None:
        source_id = tokenizer.eos_token_id
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in missing]
    with torch.no_grad():
        weight_in = base.get_input_embeddings().weight
        for i in new_ids:
            weight_in[i] = weight_in[source_id]
        out = base.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != weight_in.data_ptr():
            for i in new_ids:
                out.weight[i] = out.weight[source_id]
    return ids  # type: ignore[return-value]


def _check_loaded_weights(base, info: dict, path: Path) -> None:
    """Weights config.json names but the files lack would start random (transformers only logs them), and a
    separate lm_head loaded beside a config that says "tied" would be replaced by the embeddings at the next
    resize (`add_latent_tokens`): the first is refused, the second recorded as untied."""
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    missing = [k for k in info.get("missing_keys", ()) if not (tied and k.endswith("lm_head.weight"))]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: the weights lack {len(missing)} tensor(s) the config.json model has ({shown}); "
                              "a partial or other-architecture checkpoint would start those at random")
    if head is not None and not tied:
        for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
            config.tie_word_embeddings = False


def _check_vocabulary(base, tokenizer, path: Path) -> None:
    """Tokens past the embedding table would get random rows when the latent tokens resize it."""
    known = len([t for t in tokenizer.get_vocab() if t not in LATENT_TOKENS])
    rows = base.get_input_embeddings().num_embeddings
    if known > rows:
        raise CheckpointError(f"{path}: the tokenizer has {known} tokens but the model's embedding table has "
                              f"{rows} rows (config.json's vocab_size): the tokenizer is not this checkpoint's")


def _check_checkpoint_dir(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist (a spec must be one of {BUILTIN_SPECS} or a local directory)")
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} holds no config.json: not a transformers checkpoint directory")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object (it holds a {type(config).__name__})")
    if config.get("model_type") == "internvl_chat":
        raise CheckpointError(
            f"{config_file} is the original InternVL layout (model_type 'internvl_chat', remote code); this engine "
            "loads the transformers format: use the '-hf' release (e.g. OpenGVLab/InternVL3-1B-hf) or convert this "
            "one with transformers' models/internvl/convert_internvl_weights_to_hf.py (in its source repository)"
        )
    if config.get("model_type") != "internvl":
        raise CheckpointError(
            f"{config_file} has model_type {config.get('model_type')!r}; expected 'internvl' "
            "(an InternVL3 checkpoint in the transformers format, e.g. InternVL3-1B-hf)"
        )
    missing = []
    weights = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    if not any((path / w).is_file() for w in weights):
        missing.append(f"weights (one of {weights})")
    tokenizer_files = ["tokenizer.json", "vocab.json"]
    if not any((path / t).is_file() for t in tokenizer_files):
        missing.append(f"tokenizer (one of {tokenizer_files})")
    if not any((path / p).is_file() for p in ("preprocessor_config.json", "processor_config.json")):
        missing.append("image processor (preprocessor_config.json)")
    if missing:
        raise CheckpointError(f"checkpoint directory {path} is missing: {'; '.join(missing)}")


EXPORT_STATE_FILE = "coconut_training_state.json"


def export_model(model: MultimodalCoconut, tokenizer, image_processor: ImageProcessor, out_dir: str | os.PathLike,
                 *, training_state: dict | None = None) -> Path:
    """Write a transformers-format checkpoint (safetensors weights, config, tokenizer with the latent tokens,
    image processor, and the processor config that transformers' `AutoProcessor` reads: InternVL's, with this
    model's image tokens per tile) that `load_model(out_dir)` and `load_model_path` accept. `training_state` (the
    trainer's epoch, curriculum stage and step of these weights) goes into `EXPORT_STATE_FILE`, so the export says
    itself which stage's prompts it was trained on, whatever became of its run's other files.

    Written into a temporary sibling directory and renamed into place (`engine.utils.io.atomic_directory`: fsynced,
    ordinary permissions), so an interrupted export never leaves a half-written checkpoint at `out_dir`; an
    existing export there is replaced only once the new one is complete. A file at `out_dir`, or a folder with
    other files than an earlier export's (no config.json), is refused: the export replaces the whole folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"export_model: {out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise ValueError(f"export_model: {out_dir} holds files but no earlier export (no config.json); an export "
                         "replaces the whole folder, so give a new or empty folder (or an earlier export's)")
    with atomic_directory(out_dir) as tmp:
        # Tied embeddings: save_pretrained stores the shared tensor once and records the tie in config.json.
        model.base.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        image_processor.save_pretrained(tmp)
        # without it AutoProcessor would put 256 <IMG_CONTEXT> per tile, whatever the model's pixel shuffle gives
        processor_config = {"processor_class": "InternVLProcessor", "image_seq_length": image_processor.tokens_per_tile}
        (Path(tmp) / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
        if training_state is not None:
            (Path(tmp) / EXPORT_STATE_FILE).write_text(json.dumps(training_state, indent=2) + "\n")
    return out_dir


def read_export_state(model_dir: str | os.PathLike) -> dict | None:
    """What an export of this engine records about its training (`EXPORT_STATE_FILE`: epoch, stage, tiling,
    curriculum settings); None for a checkpoint without the file, and, with a warning, for one whose file is not a
    JSON object."""
    path = Path(model_dir) / EXPORT_STATE_FILE
    try:
        state = json.loads(path.read_text())
    except OSError:
        return None
    except ValueError:
        state = None
    if not isinstance(state, dict):
        log.warning("%s is not a JSON object; not read", path)
        return None
    return state


def export_stage(model_dir: str | os.PathLike) -> int | None:
    """The curriculum stage of the epoch an export holds: what the export itself records (`EXPORT_STATE_FILE`),
    else, for an export without it, from its run's history.json (`epoch_NNN`, `final`: the last epoch, `best`: the
    best validated one, by the trainer's rule; a run stopped early has no history.json yet); None when that
    cannot be told. `best` is often an earlier stage's epoch than the last."""
    model_dir = Path(model_dir)
    state = read_export_state(model_dir)
    if state is not None:
        stage = state.get("stage")
        if isinstance(stage, int) and not isinstance(stage, bool):
            return stage
        log.warning("%s holds no integer stage; reading the run's history.json", model_dir / EXPORT_STATE_FILE)
    try:
        history = json.loads((model_dir.parent / "history.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(history, list) or not history:
        return None
    name = model_dir.name
    chosen = None
    if name == "final":
        chosen = history[-1]
    elif name.startswith("epoch_") and name[6:].isdigit():
        chosen = next((h for h in history if h.get("epoch") == int(name[6:])), None)
    elif name == "best":
        from engine.eval.metrics import validation_score

        scored = [h for h in history if validation_score(h) is not None]
        chosen = max(scored, key=validation_score, default=None)  # the first of equals, as the trainer keeps it
    stage = chosen.get("stage") if isinstance(chosen, dict) else None
    return stage if isinstance(stage, int) else None


def _trained_tiles(path: Path) -> int | None:
    """The `max_tiles` an export of this engine was trained with: its `EXPORT_STATE_FILE`'s, else (an export
    written before the state file recorded it) its run's config.json's; None for other checkpoints."""
    if not (path / EXPORT_STATE_FILE).is_file():
        return None
    try:
        run_config = json.loads((path.parent / "config.json").read_text())
    except (OSError, ValueError):
        run_config = None
    for settings in (read_export_state(path), run_config):
        value = settings.get("max_tiles") if isinstance(settings, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


def _tiling(max_tiles: int | None, hf_processor, path: Path) -> int:
    """``max_tiles``, or the checkpoint's own when None: what an export of this engine was trained with
    (`_trained_tiles`), else its image processor's `max_patches`. A value other than the one an export was trained
    with is warned about (its prompts hold other image tokens than in training); one other than a published
    checkpoint's processor default is only noted (tiling is a choice made per run there)."""
    trained = _trained_tiles(path)
    own = trained if trained is not None else checkpoint_max_tiles(hf_processor)
    if max_tiles is None:
        return own
    if max_tiles != own:
        (log.warning if trained is not None else log.info)(
            "%s: images cut into at most %d tiles; %s %d%s", path, max_tiles,
            "it was trained with" if trained is not None else "its image processor says", own,
            f" (max_tiles={own} to match)" if trained is not None else "",
        )
    return max_tiles


def _check_processor_tile(hf_processor, config, path: Path) -> None:
    """The image processor's tile must be the vision tower's input size: a preprocessor_config.json without its
    size (transformers then assumes 384) would otherwise fail at the first image, blaming the image."""
    from engine.data.images import tile_size_from_config

    size = getattr(hf_processor, "size", None)
    got = (getattr(size, "height", None), getattr(size, "width", None))
    want = tile_size_from_config(config)
    if got != (want, want):
        raise CheckpointError(f"{path / 'preprocessor_config.json'}: tiles of {got[0]}x{got[1]} pixels, but the "
                              f"model's vision tower takes {want}x{want} (config.json); fix its size")  # fmt: skip


def load_model(
    spec: str | os.PathLike = "tiny",
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    max_tiles: int | None = None,
    model_overrides: dict[str, Any] | None = None,
    init_token: str | None = "<<",
) -> tuple[MultimodalCoconut, Any, ImageProcessor]:
    """Build or load a model. Returns ``(MultimodalCoconut, tokenizer, ImageProcessor)``.

    ``device="meta"`` builds a built-in spec without memory (sizes and structure only). ``max_tiles``: the most
    tiles an image is cut into; None takes a checkpoint's own (its image processor's `max_patches`, which
    transformers' InternVLProcessor tiles up to, and which an export records), 1 for a built-in spec."""
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        dtype = getattr(torch, dtype)  # "bfloat16" as torch.bfloat16
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (torch.float32, torch.bfloat16, ...), got {dtype!r}")
    for name, value in (("max_tiles", 1 if max_tiles is None else max_tiles), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    attn_implementation = check_attention_backend(attn_implementation)
    spec_str = str(spec)
    if spec_str in BUILTIN_SPECS:
        config, tokenizer = builtin_config(spec_str, model_overrides)
        config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
        config.vision_config._attn_implementation = attn_implementation
        # The geometries are materialised on the target device (an 8B model is 32 GB in fp32); the tiny model is
        # built on the host as always (its values per seed are what the recorded demo runs used).
        base = build_random_base(config, device=device, seed=seed, on_meta_first=spec_str in GEOMETRIES)
        max_tiles = 1 if max_tiles is None else max_tiles
        hf_processor = make_hf_image_processor(config.vision_config.image_size[0], max_tiles)
    else:
        path = Path(spec_str).expanduser()
        _check_checkpoint_dir(path)
        if model_overrides:
            raise ValueError(f"model_overrides apply to the 'tiny' spec only; the checkpoint {path} has its sizes in its "
                             f"config.json (drop model_overrides, e.g. --set model_overrides={{}}); got {model_overrides}")
        try:  # a truncated weights file or weights of other sizes than config.json says: named, not a deep traceback
            base, info = InternVLForConditionalGeneration.from_pretrained(
                str(path), dtype=dtype, local_files_only=True, attn_implementation=attn_implementation,
                output_loading_info=True,
            )
        except Exception as e:  # noqa: BLE001 - safetensors, torch and transformers each raise their own types
            raise CheckpointError(f"{path}: the model cannot be loaded from its config.json and weights "
                                  f"({type(e).__name__}: {first_line(e)})") from e  # fmt: skip
        _check_loaded_weights(base, info, path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: the tokenizer cannot be loaded from its tokenizer files "
                                  f"({type(e).__name__}: {first_line(e)})") from e  # fmt: skip
        try:
            hf_processor = load_hf_image_processor(path)
        except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError or its own types here
            raise CheckpointError(f"{path}: the image processor cannot be loaded from preprocessor_config.json / "
                                  f"processor_config.json ({type(e).__name__}: {first_line(e)})") from e  # fmt: skip
        config = base.config
        _check_vocabulary(base, tokenizer, path)
        _check_processor_tile(hf_processor, config, path)
        max_tiles = _tiling(max_tiles, hf_processor, path)
        image_token = tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT_TOKEN)
        if getattr(config, "image_token_id", image_token) != image_token:  # the forward would find no image slots
            raise CheckpointError(f"{path}: config.json's image_token_id is {config.image_token_id}, but the "
                                  f"tokenizer's {IMAGE_CONTEXT_TOKEN} is {image_token}; make them agree")

    latent_ids = add_latent_tokens(base, tokenizer, init_token=init_token)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base.to(device=device, dtype=dtype)
    image_processor = ImageProcessor.for_model_config(config, max_tiles=max_tiles, hf_processor=hf_processor)
    start_id, end_id, latent_id = latent_ids
    model = MultimodalCoconut(
        base,
        latent_id=latent_id,
        start_latent_id=start_id,
        end_latent_id=end_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    log.debug("loaded %s: %.1fM parameters", spec_str, sum(p.numel() for p in base.parameters()) / 1e6)
    return model, tokenizer, image_processor
