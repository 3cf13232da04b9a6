"""load_model: built-in specs, local checkpoints, latent tokens, bad paths; the `kernels` package name."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from engine import load_model
from engine.model.loading import CheckpointError, add_latent_tokens, export_model, internvl3_1b_geometry_config
from engine.model.tiny_tokenizer import build_tiny_tokenizer
from engine.vocab import LATENT_TOKENS
from tests.helpers import random_pixels, sample_ids


def test_tiny_is_deterministic_per_seed():
    a, _, _ = load_model("tiny", seed=3)
    b, _, _ = load_model("tiny", seed=3)
    c, _, _ = load_model("tiny", seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), f"{name} differs for the same seed"
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_latent_tokens_added_and_initialised_from_an_existing_row(tiny):
    model, tok, proc = tiny
    ids = [tok.convert_tokens_to_ids(t) for t in LATENT_TOKENS]
    assert ids == [model.start_latent_id, model.end_latent_id, model.latent_id]
    assert len(set(ids)) == 3 and all(i >= 0 for i in ids)
    weight = model.base.get_input_embeddings().weight
    assert weight.shape[0] >= len(tok)
    source = tok.eos_token_id  # "<<" is not a single token of the tiny vocabulary, so eos is the source
    for i in ids:
        assert torch.equal(weight[i], weight[source])
    # Each special token is one token.
    for t in LATENT_TOKENS:
        assert len(tok(t, add_special_tokens=False).input_ids) == 1


def test_untied_lm_head_rows_are_initialised_too():
    from transformers import InternVLForConditionalGeneration

    from engine.model.loading import TinyModelConfig, tiny_internvl_config

    tok = build_tiny_tokenizer()
    config = tiny_internvl_config(tok, TinyModelConfig())
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    base = InternVLForConditionalGeneration(config)
    assert base.lm_head.weight.data_ptr() != base.get_input_embeddings().weight.data_ptr()
    before = len(tok)
    ids = add_latent_tokens(base, tok, init_token="###")
    assert len(tok) == before + 3
    source = tok.encode("###", add_special_tokens=False)[0]
    for i in ids:
        assert torch.equal(base.get_input_embeddings().weight[i], base.get_input_embeddings().weight[source])
        assert torch.equal(base.lm_head.weight[i], base.lm_head.weight[source])
    assert not torch.equal(base.lm_head.weight[source], base.get_input_embeddings().weight[source])


def test_export_then_load_local_checkpoint(tiny, tmp_path):
    model, tok, proc = tiny
    out = export_model(model, tok, proc, tmp_path / "export")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded, tok2, proc2 = load_model(out)
    assert len(tok2) == len(tok), "latent tokens must not be added twice"
    assert (loaded.latent_id, loaded.start_latent_id, loaded.end_latent_id) == (
        model.latent_id,
        model.start_latent_id,
        model.end_latent_id,
    )
    assert proc2.tokens_per_tile == proc.tokens_per_tile and proc2.tile_size == proc.tile_size
    ids = torch.tensor([sample_ids(tok, model, n_latents=2)])
    pv = random_pixels(1, proc.tile_size, 0)
    # Same weights; memory layout after loading can change fp32 summation order by an ulp.
    torch.testing.assert_close(loaded(ids, None, pv).logits, model(ids, None, pv).logits, atol=1e-6, rtol=0)
    # Re-exporting over an existing export replaces it atomically.
    export_model(loaded, tok2, proc2, out)
    assert not list(tmp_path.glob(".export.*")), "no temporary directory may be left behind"


def _processor_view(out):
    """What transformers' InternVLProcessor reads from an export: its processor config and the tokenizer's named
    image tokens."""
    from transformers import AutoTokenizer

    config = json.loads((out / "processor_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    names = ("start_image_token", "end_image_token", "context_image_token", "video_token")
    return config, tok, {name: getattr(tok, name) for name in names}


def test_export_carries_what_transformers_processor_reads(tiny, tmp_path):
    from engine.vocab import IMAGE_CONTEXT_TOKEN, IMAGE_END_TOKEN, IMAGE_START_TOKEN, VIDEO_TOKEN

    model, tok, proc = tiny
    out = export_model(model, tok, proc, tmp_path / "export")
    config, hf_tok, named = _processor_view(out)
    assert config == {"processor_class": "InternVLProcessor", "image_seq_length": proc.tokens_per_tile}
    assert named == {"start_image_token": IMAGE_START_TOKEN, "end_image_token": IMAGE_END_TOKEN,
                     "context_image_token": IMAGE_CONTEXT_TOKEN, "video_token": VIDEO_TOKEN}
    assert hf_tok.context_image_token_id == model.image_token_id
    loaded, _, _ = load_model(out)  # and it still loads as before, processor config and all
    assert loaded.image_token_id == model.image_token_id


def test_export_loads_with_transformers_autoprocessor(tiny, tmp_path):
    pytest.importorskip("torchvision")  # transformers' InternVL processor builds a video processor with it
    from PIL import Image
    from transformers import AutoProcessor

    model, tok, proc = tiny
    out = export_model(model, tok, proc, tmp_path / "export")
    processor = AutoProcessor.from_pretrained(str(out))
    pixels = Image.new("RGB", (proc.tile_size, proc.tile_size), (10, 200, 30))
    batch = processor(text=["<IMG_CONTEXT> what colour?"], images=[pixels], return_tensors="pt")
    tiles = batch["pixel_values"].shape[0]
    assert int((batch["input_ids"][0] == model.image_token_id).sum()) == proc.tokens_per_tile * tiles
    logits = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"].float()).logits
    assert torch.isfinite(logits).all()  # the processor's sequence is one the model takes


def test_an_export_tiles_as_it_was_trained_in_load_model_and_in_transformers(tmp_path, caplog):
    """load_model(path) cut every image into one tile whatever the export's image processor said, and an export
    of a model loaded from a checkpoint kept that checkpoint's max_patches instead of the tiling it trained with."""
    model, tok, proc = load_model("tiny", max_tiles=6)
    out = export_model(model, tok, proc, tmp_path / "six")
    _, _, loaded = load_model(out)
    assert loaded.max_tiles == 6 and loaded.num_tiles_for_size(224, 448) == proc.num_tiles_for_size(224, 448) > 1
    (out / "coconut_training_state.json").write_text(json.dumps({"stage": 1, "max_tiles": 6}))  # a training run's
    with caplog.at_level("WARNING"):
        _, _, two = load_model(out, max_tiles=2)
    assert two.max_tiles == 2 and "it was trained with 6 (max_tiles=6 to match)" in caplog.text
    # loaded from the six-tile export, used at two tiles, exported again: the new export says two
    again = export_model(model, tok, two, tmp_path / "two")
    assert json.loads((again / "preprocessor_config.json").read_text())["max_patches"] == 2
    assert load_model(again)[2].max_tiles == 2
    assert load_model("tiny")[2].max_tiles == 1  # a built-in spec: one tile unless asked
    # an export written before the state file recorded the tiling: its run's config.json says what it trained with
    (out / "coconut_training_state.json").write_text(json.dumps({"stage": 1}))
    (tmp_path / "config.json").write_text(json.dumps({"max_tiles": 3}))
    assert load_model(out)[2].max_tiles == 3


def test_the_image_processor_pickles_for_spawned_workers(tiny):
    """Its lock did not pickle, so DataLoader workers started by spawn or forkserver failed at their start."""
    import pickle

    from PIL import Image

    _, _, proc = tiny
    clone = pickle.loads(pickle.dumps(proc))
    counted = proc.stats()["images"]
    image = Image.new("RGB", (40, 30), (200, 10, 90))
    assert torch.equal(clone(image).pixel_values, proc(image).pixel_values)
    assert clone.stats()["images"] == proc.stats()["images"] == counted + 1  # each its own count, with its own lock


def test_bad_checkpoint_paths(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"is not a directory"):
        load_model(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty holds no config.json"):
        load_model(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"model_type 'llama'; expected 'internvl'"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "internvl"}))
    with pytest.raises(CheckpointError, match=r"missing: weights .*; tokenizer .*; image processor"):
        load_model(empty)


def test_damaged_weights_or_tokenizer_are_named_with_the_folder(tiny, tmp_path):
    """A truncated weights file, weights of other sizes than config.json says, or a broken tokenizer.json: a
    CheckpointError naming the folder (and what failed), not safetensors', torch's or tokenizers' traceback."""
    from engine import load_model

    model, tok, proc = tiny
    out = export_model(model, tok, proc, tmp_path / "export")
    weights = next(out.glob("*.safetensors"))
    good = weights.read_bytes()
    weights.write_bytes(good[:100])
    with pytest.raises(CheckpointError, match=r"export: the model cannot be loaded .*\((\w+Error)"):
        load_model(out)
    weights.write_bytes(good)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 8
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"export: the model cannot be loaded"):
        load_model(out)
    config["text_config"]["intermediate_size"] -= 8
    (out / "config.json").write_text(json.dumps(config))
    (out / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"export: the tokenizer cannot be loaded"):
        load_model(out)


def test_an_image_processor_of_another_tile_size_is_named(tiny, tmp_path):
    """A preprocessor_config.json without its size (transformers assumes 384 pixels) would fail at the first
    training image, blaming the image."""
    from engine import load_model

    model, tok, proc = tiny
    out = export_model(model, tok, proc, tmp_path / "export")
    (out / "preprocessor_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"preprocessor_config.json: tiles of 384x384 pixels, but the model's "
                                              r"vision tower takes 224x224"):  # fmt: skip
        load_model(out)


def test_bad_spec_arguments():
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        load_model("tiny", attn_implementation="fast")
    with pytest.raises(ValueError, match=r"unknown tiny model override\(s\) \['hidden'\]"):
        load_model("tiny", model_overrides={"hidden": 3})


def test_internvl3_1b_geometry_sizes():
    from transformers import InternVLForConditionalGeneration

    from engine.vocab import tokens_per_tile_from_config

    config = internvl3_1b_geometry_config(build_tiny_tokenizer())
    with torch.device("meta"):
        base = InternVLForConditionalGeneration(config)
    n = sum(p.numel() for p in base.parameters())
    assert 0.80e9 < n < 0.95e9, n
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (896, 24, 14, 2)
    assert text.hidden_size // text.num_attention_heads == 64
    assert tokens_per_tile_from_config(config) == 256


def test_kernels_package_does_not_confuse_transformers():
    """transformers probes for the hub package named `kernels`; ours must not be taken for it, and the probe
    (which imports the package in some transformers versions, 5.23 among them) must load none of its kernels."""
    code = (
        "import sys, transformers\n"
        "from transformers.utils.import_utils import is_kernels_available\n"
        "from engine import load_model\n"
        "m, _, _ = load_model('tiny')\n"
        "import torch; m(torch.tensor([[5, 6, 7]]))\n"
        "print(is_kernels_available(), any(name.startswith('kernels.') for name in sys.modules))\n"
    )
    # without a GPU, where nothing of the engine's own needs its kernels (on one, its fast paths import them)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["False", "False"], out.stdout


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"text_layers": 0}, "text_layers must be an integer >= 1, got 0"),
        ({"text_layers": "2"}, "text_layers must be an integer >= 1, got '2'"),
        ({"text_heads": 3}, r"text_hidden_size \(64\) must be a multiple of text_heads \(3\)"),
        ({"text_heads": 4, "text_kv_heads": 3}, r"text_heads \(4\) must be a multiple of text_kv_heads \(3\)"),
        ({"text_hidden_size": 12, "text_heads": 4}, "text head width .* = 3 must be even"),
        ({"image_size": 112, "patch_size": 13}, r"image_size \(112\) must be a multiple of patch_size \(13\)"),
        ({"image_size": 84, "patch_size": 28}, "3 patches per side must be even"),
        ({"tie_word_embeddings": "no"}, "tie_word_embeddings must be true or false"),
    ],
)
def test_tiny_model_sizes_that_cannot_be_built_are_named(overrides, needle):
    """Found here, not as a transformers validation error or a shape mismatch in the first training step."""
    from engine.model.loading import TinyModelConfig

    with pytest.raises(ValueError, match=needle):
        TinyModelConfig.from_overrides(overrides)


def test_load_model_arguments_of_the_wrong_type_are_named_before_building():
    from engine import load_model

    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        load_model("tiny", dtype=torch.int64)
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        load_model("tiny", dtype="f32")
    with pytest.raises(ValueError, match="max_tiles must be an integer, got '4'"):
        load_model("tiny", max_tiles="4")
    with pytest.raises(ValueError, match="seed must be an integer"):
        load_model("tiny", seed="a")
    model, _, _ = load_model("tiny", dtype="bfloat16")  # a dtype's name is taken as the dtype
    assert next(model.parameters()).dtype == torch.bfloat16


def test_the_image_processor_names_inputs_it_cannot_tile(tiny, tmp_path):
    """Not a pathlib TypeError, an AttributeError on None, a folder called 'not found', or an empty image tiled."""
    from PIL import Image

    from engine.data.images import ImageError

    _, _, proc = tiny
    for bad in (None, torch.zeros(3, 8, 8)):
        with pytest.raises(TypeError, match="takes a PIL image or an image file path"):
            proc(bad)
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        proc(tmp_path)
    with pytest.raises(ImageError, match="0x0 pixels: nothing to tile"):
        proc(Image.new("RGB", (0, 0)))
    assert proc(Image.new("L", (1, 1))).num_tiles == 1  # tiny, grey: converted and tiled
    with pytest.raises(ImageError, match="mode 'La' cannot be converted to RGB"):
        proc(Image.new("La", (4, 4)))


def test_a_palette_image_keeps_its_opaque_colours(tiny, tmp_path):
    """A palette PNG with a transparent index: converted to RGB it keeps that index's colour as a colour key, and
    transformers' RGB conversion whitened every pixel of that colour, opaque ones too."""
    from PIL import Image

    _, _, proc = tiny
    size = proc.tile_size
    image = Image.new("P", (size, size), 2)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 0] + [0] * 759)  # index 0 transparent black, index 2 opaque black
    image.paste(0, (0, 0, size // 4, size))
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    for source in (path, Image.open(path)):
        pixels = proc(source).pixel_values[0]
        black = proc(Image.new("RGB", (size, size))).pixel_values[0]
        assert torch.equal(pixels[:, :, size // 2], black[:, :, size // 2])  # the opaque black column stays black


def test_wide_grayscale_images_keep_their_greys_and_a_folder_is_not_called_missing(tiny, tmp_path):
    """A 16-bit grayscale PNG (a scan, a medical image) came out white: Pillow's RGB conversion clips such values at
    255 instead of scaling them. 32-bit integer and float images likewise. The image check called a folder named like
    an image "not found"."""
    import numpy as np
    from PIL import Image

    from engine.data.images import find_image_problems

    _, _, proc = tiny
    size = proc.tile_size
    grey = proc(Image.fromarray(np.full((size, size), 128, np.uint8))).pixel_values
    for name, image in (("16-bit", Image.fromarray(np.full((size, size), 128 * 257, np.uint16))),
                        ("32-bit", Image.fromarray(np.full((size, size), 128 * 257, np.int32))),
                        ("float", Image.fromarray(np.full((size, size), 128 / 255, np.float32)))):
        torch.testing.assert_close(proc(image).pixel_values, grey, msg=name)
    path = tmp_path / "scan.png"
    Image.fromarray(np.full((size, size), 128 * 257, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")
    torch.testing.assert_close(proc(path).pixel_values, grey)
    folder = tmp_path / "photo.jpg"
    folder.mkdir()
    assert find_image_problems([folder], progress=False) == {str(folder): f"image path {folder} is a folder, not an image file"}


def test_an_image_past_the_decompression_limit_is_named(tiny, tmp_path):
    import struct
    import zlib

    from engine.data.dataset import image_size
    from engine.data.images import ImageError

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "huge.png"  # a header of 20000 x 20000 pixels
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    _, _, proc = tiny
    with pytest.raises(ImageError, match=r"huge.png.*exceeds limit"):
        proc(path)
    with pytest.raises(ImageError, match=r"huge.png.*exceeds limit"):
        image_size(str(path))


def test_a_checkpoint_takes_no_model_overrides_and_its_image_token_must_be_the_tokenizers(tiny, tmp_path):
    """Overrides were ignored for a checkpoint (a demo config's text_layers: 3 trained a 2-layer checkpoint without
    a word); a config.json whose image_token_id is not the tokenizer's <IMG_CONTEXT> failed at the first batch,
    blaming it."""
    model, tok, proc = tiny
    out = export_model(model, tok, proc, tmp_path / "export")
    with pytest.raises(ValueError, match=r"model_overrides apply to the 'tiny' spec only; the checkpoint .* config.json"):
        load_model(out, model_overrides={"text_layers": 3})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "image_token_id": 5}))
    with pytest.raises(CheckpointError, match=r"image_token_id is 5, but the tokenizer's <IMG_CONTEXT> is \d+"):
        load_model(out)


def test_latent_tokens_the_tokenizer_has_but_the_weights_do_not_get_their_rows(tiny):
    """A tokenizer that already holds the latent tokens beside weights without their rows: the forward failed with
    an index error."""
    from engine.vocab import LATENT_TOKENS

    model, tok, _ = tiny
    base = copy.deepcopy(model.base)
    tokenizer = copy.deepcopy(tok)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in LATENT_TOKENS]
    base.resize_token_embeddings(min(ids))  # the weights end before the latent rows
    assert add_latent_tokens(base, tokenizer) == tuple(ids)
    weight = base.get_input_embeddings().weight
    assert weight.shape[0] == len(tokenizer)
    source = tokenizer.encode("<<", add_special_tokens=False)
    source = source[0] if len(source) == 1 else tokenizer.eos_token_id
    for i in ids:
        assert torch.equal(weight[i], weight[source])


def _hf_checkpoint(path, *, tie: bool, vocab: int | None = None):
    """A checkpoint as transformers' save_pretrained writes it (the -hf releases), not through the engine."""
    from transformers import InternVLForConditionalGeneration

    from engine.data.images import make_hf_image_processor
    from engine.model.loading import TinyModelConfig, tiny_internvl_config

    torch.manual_seed(0)
    tok = build_tiny_tokenizer()
    source = InternVLForConditionalGeneration(tiny_internvl_config(tok, TinyModelConfig(tie_word_embeddings=tie)))
    if vocab is not None:
        source.resize_token_embeddings(vocab)
    source.save_pretrained(path)
    tok.save_pretrained(path)
    make_hf_image_processor(source.config.vision_config.image_size[0]).save_pretrained(path)
    return source, tok


def test_a_separate_lm_head_is_kept_where_config_json_says_nothing_of_the_tie(tmp_path):
    """A config.json without the top-level tie flag (transformers then assumes a tie) beside a separate lm_head:
    the load kept the head, then the latent tokens' resize tied it to the embeddings, dropping it."""
    source, tok = _hf_checkpoint(tmp_path / "c", tie=False)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    model, _, _ = load_model(tmp_path / "c")
    head, embed = model.base.get_output_embeddings().weight, model.base.get_input_embeddings().weight
    rows = source.lm_head.weight.shape[0]
    assert head is not embed and torch.equal(head[:rows], source.lm_head.weight)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        want = source(input_ids=ids).logits
        got = model.base(input_ids=ids).logits[..., :rows]
    torch.testing.assert_close(got, want)


def test_weights_missing_from_the_files_or_a_tokenizer_past_the_vocabulary_are_refused(tmp_path):
    """Both loaded without a word: missing tensors started at random (transformers only logs them), and tokens past
    the embedding table got random rows when the latent tokens resized it."""
    from safetensors.torch import load_file, save_file

    _hf_checkpoint(tmp_path / "c", tie=False)
    weights = tmp_path / "c" / "model.safetensors"
    tensors = load_file(weights)
    head = next(k for k in tensors if k.endswith("lm_head.weight"))
    del tensors[head]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"c: the weights lack 1 tensor\(s\) .*\(lm_head.weight\)"):
        load_model(tmp_path / "c")
    _, tok = _hf_checkpoint(tmp_path / "v", tie=True, vocab=100)
    with pytest.raises(CheckpointError, match=rf"the tokenizer has {len(tok)} tokens but the model's embedding table has 100 rows"):
        load_model(tmp_path / "v")


def test_config_json_of_the_original_layout_or_not_an_object_and_a_broken_processor_are_named(tiny, tmp_path):
    empty = tmp_path / "c"
    empty.mkdir()
    (empty / "config.json").write_text("null")
    with pytest.raises(CheckpointError, match=r"config.json is not a JSON object \(it holds a NoneType\)"):
        load_model(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "internvl_chat", "architectures": ["InternVLChatModel"]}))
    with pytest.raises(CheckpointError, match=r"original InternVL layout .*-hf.*convert_internvl_weights_to_hf"):
        load_model(empty)
    model, tok, proc = tiny
    out = export_model(model, tok, proc, tmp_path / "export")
    (out / "preprocessor_config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"export: the image processor cannot be loaded"):
        load_model(out)


def test_an_export_never_replaces_a_file_or_a_folder_of_other_files(tiny, tmp_path):
    """export_model replaced whatever stood at its path: a user's folder was deleted, and a file was moved aside
    before the call failed halfway."""
    model, tok, proc = tiny
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files but no earlier export"):
        export_model(model, tok, proc, folder)
    assert (folder / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me too")
    with pytest.raises(ValueError, match=r"a_file is a file, not a folder"):
        export_model(model, tok, proc, a_file)
    assert a_file.read_text() == "keep me too" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "mine"]
    export_model(model, tok, proc, tmp_path / "export")
    export_model(model, tok, proc, tmp_path / "export")  # an earlier export is replaced
    assert load_model(tmp_path / "export")[0].latent_id == model.latent_id
