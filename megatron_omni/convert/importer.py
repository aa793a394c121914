"""Hugging Face / FunASR / M2-omni release -> megatron-omni distributed checkpoint.

Sources (any of the first three together, or the release alone):

* ``llama``: a Llama-3 directory (``config.json`` + safetensors, sharded or not) -> ``llm.*``;
* ``qwen2vl``: a Qwen2-VL directory -> ``vision_model.*`` (its vision tower, keys ``visual.*`` as
  Hugging Face stores them, or ``model.visual.*`` as transformers 5 names them in memory);
* ``funasr``: a FunASR Paraformer ``model.pt`` / ``.safetensors`` (or its directory, whose
  ``config.yaml`` ``encoder_conf`` supplies the head count and FSMN shift) -> ``audio_model.*``;
* ``release``: the authors' M2-omni release directory -> everything.

The target config: what the sources determine (sizes, vocabulary, RoPE) comes from their
configs; everything else from ``--config`` YAML and ``key=value`` overrides (which must agree
with the sources where both speak). A plain Llama vocabulary is extended by the 29 M2-omni special
tokens and ``model.speech_codebook_size`` speech codes; the new embedding and output rows start
as the mean of the existing rows. Projectors without a source are initialised from ``seed``
alone (same on every rank and every layout).

Every rank builds its own model chunks for the requested TP/PP, reads exactly the slices of the
source tensors its parameters hold (the links of ``models/weight_maps``) and the checkpoint is
written with megatron-omni's ``save_checkpoint`` (step 0), so ``stage.init_from`` (or
``training.load``) can start from it at this or any other layout.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..config import ConfigError, OmniConfig, from_dict, parse_overrides, validate
from ..config.loader import merge, read_config_file
from ..data.special_tokens import NUM_SPECIAL
from ..models.weight_maps import audio as audio_map
from ..models.weight_maps import llm as llm_map
from ..models.weight_maps import omni as omni_map
from ..models.weight_maps import vision as vision_map
from ..models.weight_maps.core import (
    ConversionError,
    Link,
    check_source_keys,
    read_local,
    same_shape,
)
from ..models.weight_maps.omni import canonical_name, omni_gated
from .checkpoint_io import TensorSource, check_output, read_json

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ImportRequest:
    """What the user asked for (the CLI's arguments)."""

    out: Path
    llama: Optional[Path] = None
    qwen2vl: Optional[Path] = None
    funasr: Optional[Path] = None
    release: Optional[Path] = None
    config: Optional[Path] = None
    overrides: Sequence[str] = ()
    tp: Optional[int] = None
    pp: Optional[int] = None
    seed: int = 1234
    dtype: str = "auto"
    extend_vocab: bool = True
    init_missing: bool = False
    force: bool = False


@dataclass
class ImportPlan:
    """Validated sources, the target config and the links, identical on every rank."""

    cfg: OmniConfig
    parts: list[tuple[str, TensorSource, list[Link]]] = field(default_factory=list)
    dtype: torch.dtype = torch.float32
    fresh_parts: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def __post_init__(self):
        self._by_ours = {link.ours: (link, src) for _, src, links in self.parts for link in links}

    def lookup(self, name: str):
        hit = self._by_ours.get(name)
        if hit is None and name == "llm.output_layer.weight" and \
                not self.cfg.model.llm.untie_embeddings_and_output_weights:
            # Tied embeddings: the last pipeline stage holds its own copy of the embedding as
            # output_layer.weight (not saved; megatron keeps it in sync).
            hit = self._by_ours.get("llm.embedding.word_embeddings.weight")
        return hit

    def close(self) -> None:
        for _, src, _ in self.parts:
            src.close()


# --- config derivation ---------------------------------------------------------------------------

def _get(d: dict, path: str):
    for p in path.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _llama_source(path: Path) -> tuple[dict, TensorSource]:
    hf = read_json(path / "config.json", "Llama directory")
    mt = hf.get("model_type")
    if mt not in (None, "llama"):
        raise ConversionError(f"{path}: model_type {mt!r} is not a Llama checkpoint")
    return hf, TensorSource.open(path, what=f"Llama checkpoint {path}")


def _qwen2vl_source(path: Path) -> tuple[dict, TensorSource, str]:
    hf = read_json(path / "config.json", "Qwen2-VL directory")
    mt = hf.get("model_type")
    if mt not in (None, "qwen2_vl"):
        raise ConversionError(
            f"{path}: model_type {mt!r}; only Qwen2-VL's vision tower (model_type 'qwen2_vl') is "
            f"supported (Qwen2.5-VL's differs: RMSNorm, SwiGLU, window attention)")
    if "vision_config" not in hf:
        raise ConversionError(f"{path}/config.json has no vision_config")
    src = TensorSource.open(path, what=f"Qwen2-VL checkpoint {path}")
    keys = src.keys()
    for prefix in ("visual.", "model.visual."):
        if any(k.startswith(prefix) for k in keys):
            return hf["vision_config"], src, prefix
    raise ConversionError(f"{path}: no 'visual.*' or 'model.visual.*' tensors (first keys: "
                          f"{', '.join(keys[:5])})")


def _funasr_source(path: Path) -> tuple[dict, TensorSource]:
    conf: dict = {}
    if path.is_dir():
        yaml_path = path / "config.yaml"
        if yaml_path.is_file():
            import yaml

            conf = (yaml.safe_load(yaml_path.read_text()) or {}).get("encoder_conf") or {}
        files = [path / n for n in ("model.safetensors", "model.pt")
                 if (path / n).is_file()]
        if not files:
            raise ConversionError(f"{path}: no model.safetensors or model.pt")
        path = files[0]
    return conf, TensorSource.open(path, what=f"FunASR checkpoint {path}")


def _rope_scaling_choice(source: bool, asked, where) -> bool:
    """Whether the imported LLM keeps the source's llama3 rope scaling. M2-omni runs M-RoPE with
    plain rotary frequencies (the authors' release cannot express the scaling), so a Llama-3.1 /
    3.3 checkpoint's scaling is dropped unless the config sets ``model.llm.rope_scaling: true``.
    A request for scaling on a source without it is left to the conflict check."""
    if not source:
        return False
    if asked:
        log.info("%s: keeping the checkpoint's llama3 rope scaling (model.llm.rope_scaling=true);"
                 " a release export of the result will be refused", where)
        return True
    log.warning("%s: the checkpoint's config has llama3 rope scaling; M2-omni trains M-RoPE "
                "without it (as the authors' release runs it), so it is dropped. Set "
                "model.llm.rope_scaling=true to keep it.", where)
    return False


def _user_dict(req: ImportRequest) -> dict:
    data = read_config_file(req.config) if req.config else {}
    return merge(data, parse_overrides(req.overrides))


def build_plan(req: ImportRequest) -> ImportPlan:
    """Validate the sources, derive the target config and the links (no process group needed;
    every rank calls it and gets the same answer)."""
    from .release import LLM_DERIVED, release_links, release_model_dict, release_token_ids

    if req.release and (req.llama or req.qwen2vl or req.funasr):
        raise ConversionError("--release is a complete model; it cannot be combined with "
                              "--llama/--qwen2vl/--funasr")
    if not (req.release or req.llama or req.qwen2vl or req.funasr):
        raise ConversionError("nothing to import: give --llama, --qwen2vl, --funasr or --release")
    check_output(req.out, req.force)
    user = _user_dict(req)
    derived: dict = {"model": {}}
    sources: dict[str, tuple] = {}
    provenance = {}

    if req.release:
        conf = read_json(Path(req.release) / "config.json", "release directory")
        src = TensorSource.open(req.release, what=f"release checkpoint {req.release}")
        derived["model"] = release_model_dict(conf, src.keys(),
                                              codebook=_get(user, "model.speech_codebook_size"))
        sources["release"] = (src,)
        provenance["release"] = str(req.release)
        provenance["llama_config"] = release_token_ids(conf)
    if req.llama:
        hf, src = _llama_source(Path(req.llama))
        llm = llm_map.llm_config_from_hf(hf)
        d = {f: getattr(llm, f) for f in LLM_DERIVED}
        codebook = _get(user, "model.speech_codebook_size")
        codebook = 4096 if codebook is None else int(codebook)
        if req.extend_vocab:
            d["vocab_size"] = llm.vocab_size + NUM_SPECIAL + codebook
        d["rope_scaling"] = _rope_scaling_choice(llm.rope_scaling,
                                                 _get(user, "model.llm.rope_scaling"), req.llama)
        derived["model"]["llm"] = d
        sources["llama"] = (src,)
        provenance["llama"] = str(req.llama)
        provenance["llama_config"] = {k: hf[k] for k in ("bos_token_id", "eos_token_id",
                                                        "pad_token_id") if k in hf}
        provenance["base_vocab_size"] = llm.vocab_size
    if req.qwen2vl:
        vconf, src, prefix = _qwen2vl_source(Path(req.qwen2vl))
        v = dataclasses.asdict(vision_map.vision_config_from_hf(vconf))
        v["enabled"] = True
        derived["model"]["vision"] = v
        sources["qwen2vl"] = (src, prefix)
        provenance["qwen2vl"] = str(req.qwen2vl)
    if req.funasr:
        conf, src = _funasr_source(Path(req.funasr))
        heads = conf.get("attention_heads") or _get(user, "model.audio.num_heads") or 4
        s = audio_map.infer_sanm_config(src.meta_state("encoder."), prefix="encoder.",
                              attention_heads=int(heads))
        derived["model"]["audio"] = {
            "enabled": True, "input_size": s.input_size, "hidden_size": s.output_size,
            "num_heads": s.attention_heads, "ffn_hidden_size": s.linear_units,
            "num_blocks": s.num_blocks, "kernel_size": s.kernel_size,
            "sanm_shift": int(conf.get("sanm_shfit", conf.get("sanm_shift",
                                                                _get(user, "model.audio.sanm_shift")
                                                                or 0)))}
        sources["funasr"] = (src,)
        provenance["funasr"] = str(req.funasr)

    # Parts without a source are disabled unless the user enables them explicitly.
    if not req.release:
        for part, src_name in (("vision", "qwen2vl"), ("audio", "funasr")):
            if src_name not in sources:
                derived["model"].setdefault(part, {})["enabled"] = bool(
                    _get(user, f"model.{part}.enabled"))

    conflicts = []
    for key, value in _flat(derived).items():
        if key.endswith(".enabled"):
            continue
        mine = _get(user, key)
        if mine is not None and not _same(mine, value):
            conflicts.append(f"{key}: config says {mine!r}, the source checkpoint {value!r}")
    if conflicts:
        raise ConfigError("the config disagrees with the source checkpoints (drop these keys or "
                          "fix them):\n  - " + "\n  - ".join(conflicts))
    data = merge(user, derived)
    par = data.setdefault("parallel", {})
    if req.tp is not None:
        par["tensor_model_parallel_size"] = req.tp
    if req.pp is not None:
        par["pipeline_model_parallel_size"] = req.pp
    cfg = from_dict(OmniConfig, data)
    validate(cfg)
    from ..models.omni import sanm_config, special_token_ids
    from ..models.vision import vision_out_hidden

    special_token_ids(cfg)  # vocabulary holds the special tokens and speech codes

    parts = []
    m = cfg.model
    fresh = []
    if req.release:
        src = sources["release"][0]
        links = release_links(cfg)
        check_source_keys(links, src.keys(), "", f"release checkpoint {req.release}")
        parts.append(("release", src, links))
    else:
        if "llama" in sources:
            src = sources["llama"][0]
            links = llm_map.links(m.llm, "llm.", "")
            check_source_keys(links, src.keys(), "", f"Llama checkpoint {req.llama}",
                              ignore=llm_map.IGNORED_HF)
            _check_shapes("Llama checkpoint", src, "", llm_map.expected_hf_shapes(m.llm))
            parts.append(("llama", src, links))
        else:
            fresh.append("llm")
        if m.vision.enabled:
            if "qwen2vl" in sources:
                src, prefix = sources["qwen2vl"]
                links = vision_map.links(m.vision, "vision_model.", prefix)
                check_source_keys(links, src.keys(), prefix, f"Qwen2-VL vision tower "
                                  f"{req.qwen2vl}", ignore=vision_map.IGNORED_HF)
                _check_shapes("Qwen2-VL vision tower", src, prefix,
                              vision_map.expected_hf_vision_shapes(m.vision,
                                                                   vision_out_hidden(cfg)))
                parts.append(("qwen2vl", src, links))
            else:
                fresh.append("vision")
            fresh.append("vision projector")
        if m.audio.enabled:
            if "funasr" in sources:
                src = sources["funasr"][0]
                links = audio_map.links(sanm_config(cfg), "audio_model.", "encoder.")
                check_source_keys(links, src.keys(), "encoder.", f"FunASR encoder {req.funasr}")
                _check_shapes("FunASR encoder", src, "encoder.",
                              audio_map.expected_sanm_shapes(sanm_config(cfg)))
                parts.append(("funasr", src, links))
            else:
                fresh.append("audio")
            fresh.append("audio projector")
    missing_src = [p for p in fresh if not p.endswith("projector")]
    if missing_src and not req.init_missing:
        raise ConversionError(
            f"no source for enabled part(s) {', '.join(missing_src)}: give its checkpoint, "
            f"disable it (model.<part>.enabled=false), or pass --init-missing to start it from a "
            f"random initialisation")
    if req.dtype == "auto":
        first = parts[0]
        dtype = first[1].dtype(first[2][0].hf[0]) or torch.float32
        if not dtype.is_floating_point:
            dtype = torch.float32
    else:
        dtype = DTYPES[req.dtype]
    provenance["fresh"] = fresh
    return ImportPlan(cfg, parts, dtype, fresh, provenance)


def _shape_error(what: str, key: str, got, want) -> ConversionError:
    want = tuple("any" if w is None else w for w in want)
    return ConversionError(f"{what}: {key} has shape {tuple(got)}, the config expects "
                           f"{want}")


def _check_shapes(what: str, src: TensorSource, prefix: str, expected: dict) -> None:
    """Every tensor a map expects has its shape (``None``: any size) before anything is read."""
    for key, want in expected.items():
        got = tuple(src.shape(prefix + key))
        if not same_shape(got, tuple(want)):
            raise _shape_error(what, prefix + key, got, want)


# --- per-rank work -------------------------------------------------------------------------------

PROJECTORS = tuple(p.rstrip(".") for p in omni_map.PROJECTORS)


def init_projector(name: str, module: torch.nn.Module, seed: int) -> None:
    """Initialise a projector from ``seed`` and its name only (torch's ``nn.Linear`` default
    distribution, U(-1/sqrt(in), 1/sqrt(in)) for weight and bias): identical on every rank and
    at every parallel layout."""
    for idx, layer in enumerate(module):
        if not isinstance(layer, torch.nn.Linear):
            continue
        g = torch.Generator().manual_seed(
            (int(seed) * 1_000_003 + zlib.crc32(f"{name}.{idx}".encode())) % (2**63 - 1))
        bound = 1.0 / math.sqrt(layer.in_features)
        with torch.no_grad():
            w = torch.empty(layer.weight.shape, dtype=torch.float32).uniform_(-bound, bound,
                                                                              generator=g)
            layer.weight.copy_(w)
            if layer.bias is not None:
                b = torch.empty(layer.bias.shape, dtype=torch.float32).uniform_(-bound, bound,
                                                                                generator=g)
                layer.bias.copy_(b)


def load_chunks(plan: ImportPlan, chunks: Sequence[torch.nn.Module], seed: int,
                progress: bool = True) -> dict[str, int]:
    """Fill this rank's model chunks from the sources (slices only); returns counts."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from ..models.llm import chunk_layer_range

    tp_rank = ps.get_tensor_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
    counts = {"loaded": 0, "fresh": 0, "projector_init": 0}
    todo = []
    for chunk in chunks:
        offset, _ = chunk_layer_range(chunk.llm)
        for name, param in chunk.named_parameters():
            if not name.startswith("audio_model."):  # SAN-M stays fp32 (it runs in fp32)
                param.data = param.data.to(plan.dtype)
            todo.append((canonical_name(name, offset), param))
        for pname in PROJECTORS:
            mod = getattr(chunk, pname, None)
            if mod is not None and plan.lookup(f"{pname}.0.weight") is None:
                init_projector(pname, mod, seed)
                counts["projector_init"] += sum(1 for _ in mod.parameters())
    bar = tqdm(todo, desc="import", unit="tensor", disable=not progress)
    for name, param in bar:
        hit = plan.lookup(name)
        if hit is None:
            if not name.startswith(omni_map.PROJECTORS):
                counts["fresh"] += 1
            continue
        link, src = hit
        t = read_local(link, src, param.shape, tp_rank, tp, omni_gated)
        with torch.no_grad():
            param.copy_(t)
        counts["loaded"] += 1
    return counts


def _on_rank0(fn, what: str) -> None:
    from ..training.checkpoint import _on_rank0 as impl

    impl(fn, what)


def run_import_rank(req: ImportRequest, progress: bool = True, env=None) -> Optional[dict]:
    """One rank of the import. ``env``: the process layout (``runtime.DistEnv``; default: read
    from the torchrun/Slurm environment). Reuses an existing megatron-core parallel state of the
    same TP/PP (a test process). Returns the summary on rank 0."""
    from megatron.core import parallel_state as ps

    from ..models.omni import build_omni_chunks
    from ..parallel import runtime
    from ..training.checkpoint import save_checkpoint
    from .checkpoint_io import discard_output, partial_dir, prepare_output, publish_output

    plan = build_plan(req)
    cfg = plan.cfg
    owns = not ps.model_parallel_is_initialized()
    if owns:
        runtime.initialize(cfg.parallel, seed=req.seed, env=env)
    elif (ps.get_tensor_model_parallel_world_size() != cfg.parallel.tensor_model_parallel_size or
          ps.get_pipeline_model_parallel_world_size() !=
          cfg.parallel.pipeline_model_parallel_size):
        raise ConversionError("megatron-core is already initialised with another TP/PP")
    rank = torch.distributed.get_rank()
    try:
        _on_rank0(lambda: prepare_output(req.out, req.force), f"preparing {req.out}")
    except Exception:
        if owns:
            runtime.destroy()
        raise
    try:
        torch.manual_seed(req.seed)
        chunks = build_omni_chunks(cfg)
        counts = load_chunks(plan, chunks, req.seed, progress=progress and rank == 0)
        plan.close()
        extra = {"conversion": {"tool": "tools/convert_checkpoint.py import",
                                **{k: v for k, v in plan.provenance.items()}}}
        tmp = partial_dir(req.out)
        path = save_checkpoint(tmp, 0, chunks, extra_state=extra, cfg=cfg, keep_last=0)
        torch.distributed.barrier()
        _on_rank0(lambda: publish_output(tmp, req.out, req.force), f"publishing {req.out}")
        summary = None
        if rank == 0:
            summary = {"out": str(req.out), "step_dir": str(Path(req.out) / path.name),
                       "tp": cfg.parallel.tensor_model_parallel_size,
                       "pp": cfg.parallel.pipeline_model_parallel_size,
                       "dtype": str(plan.dtype).replace("torch.", ""),
                       "fresh": plan.fresh_parts, **counts}
        return summary
    except BaseException:
        if rank == 0:
            discard_output(req.out)
        raise
    finally:
        if owns:
            runtime.destroy()
