"""A small byte-level BPE tokenizer built in code, with the same pre-tokenisation as Qwen2.

Tests, the demo and the random-weight geometry model cannot download Qwen's tokenizer; this one is trained
in milliseconds on a fixed corpus (the words the built-in synthetic task and typical VQA questions use), so
it is deterministic and the sequences stay short. Any text still tokenises: the 256-byte alphabet is kept.
"""

from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from engine.vocab import IMAGE_CONTEXT_TOKEN, IMAGE_END_TOKEN, IMAGE_START_TOKEN, VIDEO_TOKEN

EOS_TOKEN = "<|endoftext|>"

_WORDS = """
start at the top left right bottom up down cell cells grid row column move moves step steps then
what which who where when why how is are was were of on in a an to from and or it its this that
colour color red green blue yellow orange purple white black gray grey pink brown cyan
one two three four five six seven eight nine ten zero first second third last next
answer question image picture photo shows there person people man woman dog cat car table
because so therefore likely probably would could should can do does not no yes
""".split()
_CORPUS = [
    " ".join(_WORDS),
    "Start at the top-left cell. Move right, down, left, up. What colour is the cell?",
    "Step 1: move right to row 0, column 1, which is red.\n",
    "### red\n### blue\n### green\n### yellow\n",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 , . ; : ? ! ( ) - '",
]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A `Qwen2Tokenizer` over a BPE vocabulary of about `vocab_size` entries plus InternVL's image tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS_TOKEN],
        show_progress=False,
    )
    # Repeat each line so that whole words reach the merge threshold; training is deterministic.
    bpe.train_from_iterator([line for line in _CORPUS for _ in range(4)], trainer)
    model = json.loads(bpe.to_str())["model"]
    return Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        # named as InternVL's own tokenizers name them: transformers' InternVLProcessor reads these attributes
        extra_special_tokens={
            "start_image_token": IMAGE_START_TOKEN,
            "end_image_token": IMAGE_END_TOKEN,
            "context_image_token": IMAGE_CONTEXT_TOKEN,
            "video_token": VIDEO_TOKEN,
        },
        model_max_length=32768,
    )
