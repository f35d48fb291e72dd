"""Build a tiny random-weight HiDream-I1 pipeline on disk, tokenizers included, with no hub access.

The layout matches the released model: a diffusers pipeline directory without the Llama
components (``pipeline/``), and the Llama text encoder and its tokenizer in a directory of their
own (``llama/``), loaded separately exactly as one loads ``meta-llama/Meta-Llama-3.1-8B-Instruct``.
Everything is loaded back through the same ``from_pretrained`` path as real weights.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

# Bumped whenever the tiny architecture changes, so cached copies are rebuilt.
TINY_FORMAT = 2

_WORDS = (
    "a photo of an astronaut riding a horse on the moon, a cat holding a sign that says hello, "
    "red blue green yellow orange purple black white golden silver bright dark soft sharp "
    "portrait landscape city forest mountain river ocean beach sunset sunrise night day sky "
    "cloud rain snow fire water stone glass metal wood paper painting drawing watercolor oil "
    "cinematic lighting studio detailed highly realistic abstract cartoon anime digital art "
    "the of and with in on at by for from to under over behind beside small large tiny huge "
    "old young happy sad dog bird fish flower tree house car robot dragon castle window door"
)


def _corpus() -> list[str]:
    words = _WORDS.replace(",", " ,").split()
    # Every printable ASCII character alone, so each one also exists as a word end (CLIP's "x</w>").
    singles = " ".join(string.ascii_letters + string.digits + string.punctuation)
    # Deterministic pseudo-sentences so every build trains the same vocabulary.
    return [" ".join(words[i : i + 9]) for i in range(len(words))] + [_WORDS, singles]


def _bpe(vocab_size: int, special: list[str], *, word_suffix: str | None = None) -> Any:
    """Train a byte-level BPE on the built-in corpus (CLIP marks word ends with ``</w>``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    suffix: dict[str, Any] = {"end_of_word_suffix": word_suffix} if word_suffix else {}
    tok = Tokenizer(models.BPE(**suffix))
    if word_suffix:
        tok.normalizer = normalizers.Lowercase()  # CLIP's tokenizer lowercases
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        **suffix,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def _clip_tokenizer(out: Path) -> int:
    from transformers import CLIPTokenizer

    tok = _bpe(700, ["<|endoftext|>", "<|startoftext|>"], word_suffix="</w>")
    model = json.loads(tok.to_str())["model"]
    clip = CLIPTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    clip.save_pretrained(out)
    return len(clip)


def _t5_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # SentencePiece-style "▁word" pieces, as T5 expects
    trainer = trainers.UnigramTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",  # noqa: S106 (a token name, not a password)
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    vocab = [(piece, score) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    t5 = T5Tokenizer(vocab=vocab, extra_ids=0)
    t5.save_pretrained(out)
    return len(t5)


def _llama_tokenizer(out: Path) -> tuple[int, int, int]:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|begin_of_text|>", "<|eot_id|>"
    tok = _bpe(600, [bos, eos])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0), (eos, 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, model_max_length=128)
    fast.save_pretrained(out)
    return len(fast), fast.convert_tokens_to_ids(bos), fast.convert_tokens_to_ids(eos)


def _write_pipeline(root: Path, seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, HiDreamImageTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        LlamaConfig,
        LlamaForCausalLM,
        T5Config,
        T5EncoderModel,
    )

    from inference.variants import VARIANTS, scheduler_config

    torch.manual_seed(seed)
    pipe_dir, llama_dir = root / "pipeline", root / "llama"
    hidden, clip_proj, layers = 32, 32, 2

    for name in ("tokenizer", "tokenizer_2"):
        clip_vocab = _clip_tokenizer(pipe_dir / name)
    t5_vocab = _t5_tokenizer(pipe_dir / "tokenizer_3")
    llama_vocab, bos_id, eos_id = _llama_tokenizer(llama_dir)

    clip_eos = 0  # "<|endoftext|>" is the first special token the trainer saw.
    for name in ("text_encoder", "text_encoder_2"):
        CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=clip_vocab,
                hidden_size=hidden,
                intermediate_size=37,
                num_hidden_layers=layers,
                num_attention_heads=4,
                projection_dim=clip_proj,
                max_position_embeddings=128,
                eos_token_id=clip_eos,
                bos_token_id=1,
                pad_token_id=clip_eos,
            )
        ).save_pretrained(pipe_dir / name)
    T5EncoderModel(
        T5Config(vocab_size=t5_vocab, d_model=hidden, d_kv=8, d_ff=37, num_layers=layers, num_heads=4)
    ).save_pretrained(pipe_dir / "text_encoder_3")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=llama_vocab,
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
        )
    ).save_pretrained(llama_dir)

    HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[hidden, hidden],
        text_emb_dim=2 * clip_proj,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(128, 128),
        llama_layers=list(range(layers)),
    ).save_pretrained(pipe_dir / "transformer")
    # Four blocks give the released VAE's 8x scale factor, so a tiny image has the real pixel size.
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).save_pretrained(pipe_dir / "vae")

    cls, config = scheduler_config(VARIANTS["full"])
    (pipe_dir / "scheduler").mkdir()
    (pipe_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": cls, **config}))
    index = {
        "_class_name": "HiDreamImagePipeline",
        "scheduler": ["diffusers", cls],
        "vae": ["diffusers", "AutoencoderKL"],
        "transformer": ["diffusers", "HiDreamImageTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer_3": ["transformers", "T5Tokenizer"],
        # Like the released checkpoints: Llama is not part of the pipeline directory.
        "text_encoder_4": [None, None],
        "tokenizer_4": [None, None],
    }
    (pipe_dir / "model_index.json").write_text(json.dumps(index, indent=2))


def tiny_pipeline_built(root: Path | str) -> bool:
    """Whether ``root`` holds a tiny pipeline of the current format (so building it would return at once)."""
    marker = Path(root) / "tiny.json"
    return marker.exists() and json.loads(marker.read_text()).get("format") == TINY_FORMAT


def build_tiny_pipeline(root: Path | str, *, seed: int = 0) -> Path:
    """Write a tiny random-weight HiDream pipeline under ``root`` (idempotent) and return ``root``.

    Example: ``runner = HiDreamRunner.load(build_tiny_pipeline(tmp) / "pipeline", llama_path=tmp / "llama")``.
    """
    root = Path(root)
    if tiny_pipeline_built(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename, so a crash or a concurrent build never leaves half a model.
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
    try:
        _write_pipeline(staging, seed)
        (staging / "tiny.json").write_text(json.dumps({"format": TINY_FORMAT, "seed": seed}))
        if root.exists():
            shutil.rmtree(root)
        os.replace(staging, root)
    except FileExistsError:
        pass  # another process finished first; its copy is equivalent
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
