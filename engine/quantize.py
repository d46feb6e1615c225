"""``python -m engine quantize``: a dense model -> a VPTQ checkpoint in the community layout.

Layer by layer on the already-quantized prefix: the calibration sequences' hidden states enter
layer i as the quantized layers 0..i-1 produce them. Inside a layer the projections are
quantized in order (q/k/v, o, gate/up, down), each with the Hessian of its own inputs after
the earlier ones were quantized. Every finished layer is saved at once, so an interrupted run
resumes from the last finished layer.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .formats.vptq import FormatError
from .formats.vptq_writer import layer_tensors, spec_to_dict, write_checkpoint
from .loader import load_model
from .model import Transformer
from .ops import reference
from .ops.reference import as_uint16
from .vq import METHODS, QuantizedWeight, quantize_weight

CALIBRATION = Path(__file__).with_name("data") / "calibration.txt"
STAGES = (
    ("self_attn.q_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)
COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
Log = Callable[[str], None]


@dataclass
class Recipe:
    vector_len: int = 4
    centroids: int = 256
    res_centroids: int = 0
    method: str = "vptq"
    calib_sequences: int = 32  # of which half are sampled from the model itself
    calib_len: int = 256
    seed: int = 0

    def check(self) -> None:
        if self.calib_sequences < 8 or self.calib_sequences % 8:
            raise ValueError(f"--calib-sequences {self.calib_sequences}: give 8, 16, 24, ...")
        if not 1 <= self.vector_len <= 64:
            raise ValueError(f"--vector-len {self.vector_len} is outside 1..64")
        if self.calib_len < 1:
            raise ValueError(f"--calib-len {self.calib_len}: give at least 1 token")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {', '.join(METHODS)}")
        for name, value in (
            ("--centroids", self.centroids),
            ("--res-centroids", self.res_centroids),
        ):
            if value and (value < 2 or value > 65536 or value & (value - 1)):
                raise ValueError(f"{name} {value} is not a power of two in 2..65536")

    @property
    def bits(self) -> float:
        return (
            self.centroids.bit_length() - 1 + max(self.res_centroids.bit_length() - 1, 0)
        ) / self.vector_len


def calibration(model: Transformer, tok, recipe: Recipe, text: Path | None) -> torch.Tensor:
    """[S, T] token ids: windows of the text, plus sequences the model writes itself."""
    ids = tok.encode((text or CALIBRATION).read_text(encoding="utf-8"))
    t = recipe.calib_len
    n_text = min(recipe.calib_sequences // 2, len(ids) // t)  # whole windows only
    windows = [ids[i * t : (i + 1) * t] for i in range(n_text)]
    sampled = sample_sequences(model, tok, recipe.calib_sequences - len(windows), t, recipe.seed)
    text_part = torch.tensor(windows, dtype=torch.long).reshape(-1, t)
    return torch.cat([text_part, sampled.cpu()])


TOPICS = [
    "the history of Rome",
    "how to cook rice",
    "why the sky is blue",
    "a short story about a dragon",
    "the capital of Spain",
    "how computers work",
    "the water cycle",
    "a poem about the sea",
    "how to learn a language",
    "the planets of the solar system",
    "a healthy breakfast",
    "how a bicycle works",
    "the French revolution",
    "machine learning",
    "how to write a letter",
    "the life of bees",
]


@torch.no_grad()
def sample_sequences(model: Transformer, tok, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` (at least 1: calibration asks for half its sequences or more) chat answers of
    exactly ``length`` tokens, sampled at temperature 1."""
    device = model.model.norm.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    prompts = [
        tok.chat_ids([{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}])
        for i in range(count)
    ]
    width = min(len(p) for p in prompts)
    seqs = torch.tensor([p[-width:] for p in prompts], device=device)  # same-length prompt tails
    model.setup_caches(count, width + length)
    logits = model(seqs, 0, last_only=True)[:, -1]
    out = []
    for i in range(length):
        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)  # [S, 1]
        out.append(nxt)
        logits = model(nxt, width + i)[:, -1]
    return torch.cat(out, 1)


class HessianHook:
    """Accumulates X^T X of a linear layer's inputs."""

    def __init__(self, module: nn.Module):
        k = module.in_features
        self.h = torch.zeros(k, k, dtype=torch.float64, device=module.weight.device)
        self.count = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, inputs) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        self.h += x.T @ x
        self.count += x.shape[0]

    def done(self) -> torch.Tensor:
        self.handle.remove()
        return (self.h / max(self.count, 1)).float()


def run_layer(model: Transformer, i: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The hidden states after decoder layer i, one chunk of sequences at a time."""
    layer = model.model.layers[i]
    outs = []
    for x in xs:
        t = x.shape[1]
        mask = model.attention_mask(0, t)
        out, residual = layer(x, model.cos[:t], model.sin[:t], 0, mask)
        outs.append(out + residual)
    return outs


def stored(q: QuantizedWeight, dtype: torch.dtype) -> QuantizedWeight:
    """``q`` with its float tensors rounded to the checkpoint's dtype and ``dense`` rebuilt
    from them: later layers are calibrated on exactly the weights that will be loaded."""
    r = replace(
        q,
        centroids=q.centroids.to(dtype),
        scale=q.scale.to(dtype),
        bias=q.bias.to(dtype),
        res_centroids=None if q.res_centroids is None else q.res_centroids.to(dtype),
    )
    t = tensors_of("L", r, None, dtype)
    perm = t.get("L.perm")
    perm = None if perm is None else as_uint16(perm)
    inv = None if perm is None else torch.argsort(perm)
    r.dense = reference.vptq_dequant(
        t["L.indices"],
        t["L.centroids.weight"],
        t.get("L.res_centroids.weight"),
        None,
        None,
        perm,
        inv,
        t["L.weight_scale"],
        t["L.weight_bias"],
        spec=q.spec,
        dtype=torch.float32,
    )
    return r


def quantize_layer(
    model: Transformer, i: int, xs, recipe: Recipe, dtype: torch.dtype = torch.float16
) -> dict:
    layer = model.model.layers[i]
    results: dict[str, QuantizedWeight] = {}
    for probe, parts in STAGES:
        hook = HessianHook(layer.get_submodule(probe)) if recipe.method == "vptq" else None
        if hook is not None:
            run_layer(model, i, xs)
        h = None if hook is None else hook.done()
        for part in parts:
            lin = layer.get_submodule(part)
            q = quantize_weight(
                lin.weight.data,
                h,
                recipe.vector_len,
                recipe.centroids,
                recipe.res_centroids,
                recipe.method,
                seed=recipe.seed + i,
            )
            q = stored(replace(q, spec=replace(q.spec, bias=lin.bias is not None)), dtype)
            lin.weight.data.copy_(q.dense.to(lin.weight.dtype))  # later stages see it quantized
            results[f"model.layers.{i}.{part}"] = q
    return results


def tensors_of(name: str, q: QuantizedWeight, bias: torch.Tensor | None, dtype) -> dict:
    books = {
        "centroids.weight": q.centroids.to(dtype),
        "weight_scale": q.scale.to(dtype),
        "weight_bias": q.bias.to(dtype),
    }
    if q.res_centroids is not None:
        books["res_centroids.weight"] = q.res_centroids.to(dtype)
    if q.perm is not None:
        books["perm"] = q.perm
    if bias is not None:
        books["bias"] = bias.to(dtype)
    return {f"{name}.{k}": v for k, v in layer_tensors(q.spec, q.main, q.residual, books).items()}


def quantize(
    source: Path,
    out: Path,
    recipe: Recipe,
    text: Path | None = None,
    log: Log = print,
    dtype=torch.float16,
    device: str = "cpu",
) -> Path:
    """Quantize the dense model in ``source`` into ``out``; resumes an interrupted run."""
    from .tokenizer import Tokenizer

    recipe.check()
    check_out(out)
    work = out.with_name(out.name + ".partial")
    state_file = work / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    if state is not None and state["recipe"] != asdict(recipe):
        log(f"{work}: left by a run with other settings; starting over")
        shutil.rmtree(work)
        state = None
    lm = load_model(source, device, torch.float32, max_seq_len=recipe.calib_len, half_weights=False)
    model, tok = lm.model, Tokenizer(source)
    if lm.quant != "dense":
        raise FormatError(f"{source}: already quantized; give a dense (fp16/bf16) model")
    check_vector_len(model, recipe.vector_len, source)
    work.mkdir(parents=True, exist_ok=True)
    calib_file = work / "calibration.safetensors"
    needs_data = recipe.method == "vptq"  # rtn and kmeans look at the weights only
    if not needs_data:
        tokens = torch.zeros(0, recipe.calib_len, dtype=torch.long, device=device)
    elif calib_file.exists():
        tokens = load_file(str(calib_file))["tokens"].to(device)
    else:
        log("preparing calibration data (text and self-sampled answers)")
        tokens = calibration(model, tok, recipe, text).to(device)
        save_file({"tokens": tokens.cpu()}, str(calib_file))
    state = state or {"recipe": asdict(recipe), "done": 0, "layers": {}}
    chunk = 8
    model.setup_caches(chunk, recipe.calib_len)
    with torch.no_grad():
        xs = [model.model.embed_tokens(tokens[j : j + chunk]) for j in range(0, len(tokens), chunk)]
        n_layers = len(model.model.layers)
        started, fresh = time.monotonic(), 0
        for i in range(n_layers):
            if i < state["done"]:  # resume: restore the saved layer, propagate through it
                _restore(model, i, load_file(str(work / f"layer_{i}.safetensors")))
            else:
                results = quantize_layer(model, i, xs, recipe, dtype)
                saved = {}
                for name, q in results.items():
                    bias = model.get_submodule(name).bias
                    saved.update({k: v.cpu() for k, v in tensors_of(name, q, bias, dtype).items()})
                    saved[f"{name}.dense"] = q.dense.float().cpu()  # exact, only for resuming
                    state["layers"][name] = spec_to_dict(q.spec)
                save_file(saved, str(work / f"layer_{i}.safetensors"))
                state["done"] = i + 1
                state_file.write_text(json.dumps(state))
                fresh += 1
                eta = (time.monotonic() - started) / fresh * (n_layers - i - 1)
                log(f"layer {i + 1}/{n_layers} quantized; about {eta / 60:.1f} min left")
            if needs_data:
                xs = run_layer(model, i, xs)
    _write(source, out, lm, state, work, dtype)
    shutil.rmtree(work)
    return out


def check_vector_len(model: Transformer, v: int, source: Path) -> None:
    """Every projection's output rows split into vectors of v, or a ValueError naming the first
    that does not and the vector lengths that fit them all (before any work is done)."""
    rows = {
        f"model.layers.{i}.{part}": layer.get_submodule(part).weight.shape[0]
        for i, layer in enumerate(model.model.layers)
        for _, parts in STAGES
        for part in parts
    }
    bad = next(((name, n) for name, n in rows.items() if n % v), None)
    if bad is not None:
        common = math.gcd(*rows.values())
        fits = ", ".join(str(d) for d in range(1, 65) if common % d == 0)
        raise ValueError(
            f"--vector-len {v}: {bad[0]} has {bad[1]} output rows, not a multiple of {v}; "
            f"vector lengths that fit every layer of {source.name}: {fits}"
        )


def _restore(model: Transformer, i: int, saved: dict) -> None:
    for key, value in saved.items():
        if key.endswith(".dense"):
            weight = model.get_submodule(key.removesuffix(".dense")).weight
            weight.data.copy_(value.to(weight.device, torch.float32))


def check_out(out: Path) -> None:
    """Refuse, before any work, an output the finished checkpoint must not replace: it replaces
    the folder whole, so a folder of other files given as --out (a folder of models, the
    source model itself) would have been deleted. A new or empty folder is fine, and so is an
    earlier VPTQ checkpoint (quantized again with other settings)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out}: a file, not a folder; give a new folder for the checkpoint")
    if any(out.iterdir()) and not _is_vptq_checkpoint(out):
        raise ValueError(
            f"--out {out}: holds other files, which the checkpoint would replace; give a new "
            f"folder (such as {out / 'vptq'}) or an earlier VPTQ checkpoint to replace"
        )


def _is_vptq_checkpoint(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text())
        return cfg["quantization_config"]["quant_method"] == "vptq"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write(source: Path, out: Path, lm, state: dict, work: Path, dtype) -> None:
    cfg = json.loads((source / "config.json").read_text())
    quantized = set(state["layers"])
    tensors = {}
    for name, t in lm.model.state_dict().items():
        if name.rsplit(".", 1)[0] not in quantized:
            tensors[name] = t.to("cpu", dtype)
    for i in range(len(lm.model.model.layers)):
        saved = load_file(str(work / f"layer_{i}.safetensors"))
        tensors.update({k: v for k, v in saved.items() if not k.endswith(".dense")})
    cfg["quantization_config"] = {
        "quant_method": "vptq",
        "config_for_layers": state["layers"],
        "shared_layer_config": {},
    }
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    tmp = out.with_name(out.name + ".writing")
    shutil.rmtree(tmp, ignore_errors=True)
    write_checkpoint(tmp, cfg, tensors, shard_bytes=2 << 30)
    for name in COPIED:
        if (source / name).exists():
            shutil.copy(source / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(args) -> None:
    from .models import resolve_model

    recipe = Recipe(
        vector_len=args.vector_len,
        centroids=args.centroids,
        res_centroids=args.res_centroids,
        method=args.method,
        seed=args.seed,
        calib_sequences=args.calib_sequences,
        calib_len=args.calib_len,
    )
    # `demo` is the quantized demo elsewhere; its source is the dense one. Any other name is
    # the model it names (a folder "demo-llama" was taken for the demo).
    source = resolve_model("demo-dense" if args.model == "demo" else args.model)
    if source.suffix == ".gguf":
        from .models import DONE, gguf_to_safetensors

        dense = args.out.with_name(args.out.name + ".dense")  # the conversion, kept to resume
        if dense.exists() and not (dense / DONE).exists():  # not an earlier conversion
            raise ValueError(
                f"{dense}: the .gguf file's conversion goes there, but it holds other files; "
                "move them or give another --out"
            )
        source = gguf_to_safetensors(source, dense)
    t0 = time.monotonic()
    quantize(
        source,
        args.out,
        recipe,
        args.calibration,
        log=lambda m: print(m, file=sys.stderr, flush=True),
        device=args.device,
    )
    print(
        f"wrote {args.out} ({recipe.method}, v{recipe.vector_len}-k{recipe.centroids}-"
        f"{recipe.res_centroids}, {recipe.bits:g} bits per weight) in "
        f"{(time.monotonic() - t0) / 60:.1f} min"
    )
