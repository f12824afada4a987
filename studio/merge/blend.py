"""Weighted blends of adapters, exact or re-ranked, computed from the factored form.

Notation: for a LoRA module, ``dW = s * U @ D`` with ``U = lora_up`` ``[out, r]``, ``D = lora_down``
flattened to ``[r, in*kh*kw]`` and ``s = alpha / r``. A kxk conv LoRA is the same product once
``D`` is flattened (``dW[o, i, y, x] = sum_r U[o, r] D[r, i, y, x]``); a Tucker ``lora_mid`` folds into
``D`` (``D'[i] = sum_j mid[i, j] * D[j]``), so every LoRA / LoCon module is factored.

The blend of N inputs with weights ``c_i`` is ``dW = sum_i c_i s_i U_i D_i = A @ B`` where
``A = [c_1 s_1 U_1 | ... | c_N s_N U_N]`` (``[out, K]``) and ``B = [D_1; ...; D_N]`` (``[K, in]``),
``K = sum r_i``. From there:

- **concat** writes ``A`` and ``B`` as one LoRA of rank ``K`` with ``alpha = K`` (scale 1): exact.
  (Each input's factor ``c_i s_i`` is split as ``sign * sqrt|.|`` on up and ``sqrt|.|`` on down, so
  both halves keep a sane range in fp16.) kohya's "sum" mode instead adds ``U``s and ``D``s
  (cross terms) and its "concat" mode mis-scales. Finally every module gets the file's most common
  alpha, the factors absorbing the difference (``unify_alpha``), as diffusers needs.
- **svd** re-ranks to ``k``: QR both factors, ``A = Qa Ra``, ``B^T = Qb Rb``, so
  ``dW = Qa (Ra Rb^T) Qb^T``; the SVD of the small core ``Ra Rb^T = P S R^T`` (at most K x K) gives
  ``dW = (Qa P) S (Qb R)^T``, the SVD of ``dW`` itself (Qa P and Qb R are orthonormal). Keeping the
  top ``k`` is the best rank-k approximation (Eckart-Young), the same truncation a dense SVD gives,
  at ``O((out + in) K^2)`` instead of ``O(out * in * min(out, in))``, and nothing is clamped.
- **dynamic rank** (``energy``): the smallest ``k`` with ``sum_{j<k} S_j^2 >= energy * sum S^2``
  (kohya resize's ``sv_fro``), capped by ``rank`` if given.

LoHa, LoKr and full (``diff``) inputs have no low-rank factors of this form: their dense ``dW``
is added (exact), and the module goes through a dense SVD (exact before truncation). DoRA depends
on the base weight, so it can only be baked into a checkpoint (``studio.merge.bake``).

Per-block weights multiply ``c_i`` by a factor per UNet block (``in0``..``in11``, ``mid``,
``out0``..``out11`` in SGM numbering, also for SD1/SD2 names) or text encoder (``te1``, ``te2``);
coarser keys ``in`` / ``mid`` / ``out`` / ``unet`` / ``te`` apply to a whole group.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.errors import StudioError

METHODS = ("concat", "svd")


# ---- inputs ------------------------------------------------------------------------------------

@dataclass
class MergeInput:
    """One adapter to blend: its file, its weight (negative subtracts) and optional block weights."""

    path: Path
    weight: float = 1.0
    blocks: dict[str, float] | None = None

    def __post_init__(self):
        self.path = Path(self.path)
        self.weight = float(self.weight)


def parse_input(spec: str, blocks: dict[str, float] | None = None) -> MergeInput:
    """``A.safetensors:0.7`` -> MergeInput(A.safetensors, 0.7); no ``:number`` means weight 1."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and head:
        try:
            return MergeInput(Path(head), float(tail), blocks)
        except ValueError:
            pass
    return MergeInput(Path(spec), 1.0, blocks)


def parse_blocks(text: str | None) -> dict[str, float] | None:
    """``"te=0.5, in=1, mid=0, out4=0.3"`` -> {"te": 0.5, "in": 1.0, "mid": 0.0, "out4": 0.3}."""
    if not text or not text.strip():
        return None
    out = {}
    for part in re.split(r"[,\s]+", text.strip()):
        if not part:
            continue
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep or not BLOCK_KEY.fullmatch(key):
            raise StudioError(f"Block weight {part!r} is not KEY=NUMBER with a known key.",
                              "Use te, te1, te2, unet, in, mid, out, in0..in11, out0..out11, e.g. te=0.5,out=0.8.")
        try:
            out[key] = float(val)
        except ValueError as err:
            raise StudioError(f"Block weight {part!r} has no number.", "Write e.g. mid=0.5.") from err
    return out


BLOCK_KEY = re.compile(r"te[12]?|unet|in\d*|mid|out\d*|other")


def block_of(name: str) -> str:
    """The block a webUI module name belongs to: ``te1`` / ``te2`` / ``in<n>`` / ``mid`` / ``out<n>`` / ``other``.

    UNet numbering is the SGM one (``input_blocks.n`` / ``output_blocks.n``) for every family; SD1 /
    SD2 diffusers names are converted with two layers per block, as all SD UNets have.
    """
    if name.startswith("lora_te2_"):
        return "te2"
    if name.startswith(("lora_te_", "lora_te1_")):
        return "te1"
    rest = name[len("lora_unet_"):] if name.startswith("lora_unet_") else name
    if m := re.match(r"input_blocks_(\d+)_", rest):
        return f"in{m[1]}"
    if rest.startswith("middle_block_") or rest.startswith("mid_block_"):
        return "mid"
    if m := re.match(r"output_blocks_(\d+)_", rest):
        return f"out{m[1]}"
    if m := re.match(r"down_blocks_(\d+)_(resnets|attentions)_(\d+)_", rest):
        return f"in{1 + 3 * int(m[1]) + int(m[3])}"
    if m := re.match(r"down_blocks_(\d+)_downsamplers_", rest):
        return f"in{3 + 3 * int(m[1])}"
    if m := re.match(r"up_blocks_(\d+)_(resnets|attentions)_(\d+)_", rest):
        return f"out{3 * int(m[1]) + int(m[3])}"
    if m := re.match(r"up_blocks_(\d+)_upsamplers_", rest):
        return f"out{3 * int(m[1]) + 2}"
    if rest.startswith("conv_in"):
        return "in0"
    return "other"


def block_weight(name: str, blocks: dict[str, float] | None) -> float:
    """The factor ``blocks`` gives module ``name``: exact block, then its group, then ``unet``, else 1."""
    if not blocks:
        return 1.0
    b = block_of(name)
    group = re.sub(r"\d+$", "", b)  # in / out / te / mid / other
    for key in (b, group, "unet" if group in ("in", "mid", "out", "other") else "te"):
        if key in blocks:
            return float(blocks[key])
    return 1.0


# ---- one module as factors or a dense delta ------------------------------------------------------

@dataclass
class Term:
    """One input's contribution to one module: ``coef * up @ down`` (factored) or ``coef * dense``."""

    coef: float
    shape: tuple  # the target weight's shape
    up: torch.Tensor | None = None  # [out, r]
    down: torch.Tensor | None = None  # [r, in*kh*kw]
    dense: torch.Tensor | None = None  # [out, in*kh*kw]


def module_term(module, coef: float, source: str = "") -> Term:
    """``coef * dW`` of an AdapterModule, factored when it is a LoRA / LoCon, else dense (float32)."""
    if "dora_scale" in module.shapes:
        raise StudioError(f"{source or 'An input'} is a DoRA adapter ({module.name}); its change depends on the "
                          "base weights, so it cannot be blended into a LoRA without them.",
                          "Bake it into a checkpoint instead (studio merge OUT.safetensors ... --into BASE.safetensors).")
    kind = module.kind_impl
    t = {k: v.float() for k, v in module.tensors.items()}
    shape = tuple(kind.delta_shape(module.shapes))
    if kind.name == "lora":
        scale = kind.scale(module.shapes, module.alpha)
        up = t["lora_up.weight"].flatten(1)
        down = t["lora_down.weight"].flatten(1)
        if "lora_mid.weight" in t:  # Tucker: D'[i, c, y, x] = sum_j mid[i, j, y, x] D[j, c]
            down = torch.einsum("ijkl,jc->ickl", t["lora_mid.weight"], down).flatten(1)
        return Term(coef * scale, shape, up=up, down=down)
    dense = kind.delta(t, shape, module.alpha).reshape(shape[0], -1)
    return Term(coef, shape, dense=dense)


def _flat(shape: tuple) -> tuple[int, int]:
    return int(shape[0]), int(math.prod(shape[1:]))


@contextlib.contextmanager
def small_ops_threads(n: int = 1):
    """Run many small matrix ops on ``n`` CPU threads (restored after).

    The factored path does hundreds of QR / SVD calls on matrices a few dozen columns wide; split
    over OpenMP threads they spend their time synchronising, and on a busy machine (threads
    descheduled) a merge that takes 1 s on one thread took 7-50 s on two. The GPU gate keeps merges
    from overlapping other heavy jobs, so flipping the process-wide setting here is safe.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- the linear algebra --------------------------------------------------------------------------

def stack_factors(terms: list[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` [out, K] and ``B`` [K, in] with ``A @ B = sum coef * up @ down`` (factored terms only)."""
    ups, downs = [], []
    for t in terms:
        root = math.sqrt(abs(t.coef))
        ups.append(t.up * (math.copysign(root, t.coef)))
        downs.append(t.down * root)
    return torch.cat(ups, 1), torch.cat(downs, 0)


def factored_svd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD ``(U, S, Vh)`` of ``a @ b`` without forming it (QR of each factor, SVD of the core)."""
    qa, ra = torch.linalg.qr(a)  # a = qa ra,   qa [out, p] orthonormal
    qb, rb = torch.linalg.qr(b.T)  # b^T = qb rb, qb [in, q] orthonormal
    p, s, rh = torch.linalg.svd(ra @ rb.T, full_matrices=False)  # core [p, q], p, q <= K
    return qa @ p, s, rh @ qb.T


def dense_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(m, full_matrices=False)


def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """How many singular values to keep: ``rank``, or the energy rule (capped by ``rank``); at least 1."""
    n = int(s.numel())
    k = n if rank is None else min(int(rank), n)
    if energy is not None:
        e = s.double() ** 2
        total = float(e.sum())
        if total > 0:
            cum = torch.cumsum(e, 0) / total
            k_e = int(torch.searchsorted(cum, torch.tensor(min(float(energy), 1.0) - 1e-12, dtype=cum.dtype))) + 1
            k = min(k, k_e)
    return max(1, min(k, n))


def numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    """Singular values above float32 noise (the rank an exact factorisation needs)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(shape) * torch.finfo(torch.float32).eps
    return int((s > tol).sum())


def split_svd(u, s, vh, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` of rank k with ``up @ down = U_k S_k Vh_k`` (sqrt(S) on each side)."""
    root = s[:k].clamp_min(0).sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k]


def to_lora(up: torch.Tensor, down: torch.Tensor, shape: tuple, alpha: float) -> dict[str, torch.Tensor]:
    """kohya tensors for a module whose weight has ``shape`` (conv factors get their 4-D shapes)."""
    k = up.shape[1]
    if len(shape) == 4:
        down = down.reshape(k, *shape[1:])
        up = up.reshape(shape[0], k, 1, 1)
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
            "alpha": torch.tensor(float(alpha))}


@dataclass
class ModuleResult:
    rank: int
    kept_energy: float = 1.0  # fraction of ||dW||_F^2 the written module keeps


def combine(terms: list[Term], method: str, rank: int | None = None, energy: float | None = None,
            name: str = "") -> tuple[dict[str, torch.Tensor] | None, ModuleResult | None]:
    """One output module (kohya tensors) from the terms of one module; None when they cancel out."""
    if not terms:
        return None, None
    shape = max((t.shape for t in terms), key=len)  # a 1x1 conv wins over the same layer written as Linear
    flat = _flat(shape)
    for t in terms:
        if _flat(t.shape) != flat:
            raise StudioError(f"Module {name} has shape {tuple(t.shape)} in one input and {tuple(shape)} in another.",
                              "The inputs were trained on different model architectures; merge only adapters "
                              "made for the same base model family.")
    factored = [t for t in terms if t.dense is None]
    dense = [t for t in terms if t.dense is not None]
    if method == "concat" and not dense:
        a, b = stack_factors(factored)
        return to_lora(a, b, shape, a.shape[1]), ModuleResult(a.shape[1])
    if dense:
        m = sum(t.coef * t.dense for t in dense)
        if factored:
            a, b = stack_factors(factored)
            m = m + a @ b
        u, s, vh = dense_svd(m)
    else:
        u, s, vh = factored_svd(*stack_factors(factored))
    exact = numerical_rank(s, flat)
    if exact == 0:
        return None, None
    if method == "concat":  # dense inputs: an exact factorisation (all non-negligible singular values)
        k = exact
    else:
        k = min(choose_rank(s, rank, energy), exact)
    total = float((s.double() ** 2).sum())
    kept = float((s[:k].double() ** 2).sum()) / total if total else 1.0
    up, down = split_svd(u, s, vh, k)
    return to_lora(up, down, shape, k), ModuleResult(k, kept)


def unify_alpha(modules: dict[str, dict[str, torch.Tensor]], alpha: float | None = None) -> float:
    """Give every module the same ``alpha`` (default: the most common one), rescaling its factors.

    ``(a_m / r) U D == (A / r) U' D'`` with ``U' = sqrt(a_m / A) U``, ``D' = sqrt(a_m / A) D``: the
    deltas are unchanged. Why: kohya files have one alpha, and diffusers' kohya converter drops
    per-module alphas of attention layers (its alpha names keep ``processor.to_q_lora...``), so a
    file whose alphas vary by module loads with the wrong scale there.
    """
    if not modules:
        return 0.0
    if alpha is None:
        alpha = Counter(float(m["alpha"]) for m in modules.values()).most_common(1)[0][0]
    for m in modules.values():
        ratio = float(m["alpha"]) / alpha
        if ratio != 1.0:
            root = math.sqrt(ratio)
            m["lora_up.weight"] = m["lora_up.weight"] * root
            m["lora_down.weight"] = m["lora_down.weight"] * root
        m["alpha"] = torch.tensor(float(alpha))
    return alpha


# ---- whole files ---------------------------------------------------------------------------------

@dataclass
class BlendReport:
    family: str
    n_modules: int = 0
    ranks: Counter = field(default_factory=Counter)
    min_kept_energy: float = 1.0
    skipped: list[str] = field(default_factory=list)  # modules whose inputs cancel out
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ranks = ", ".join(f"{r}x{n}" for r, n in sorted(self.ranks.items()))
        text = f"{self.n_modules} modules ({self.family}), ranks {ranks or '-'}"
        if self.min_kept_energy < 1.0:
            text += f"; the truncation keeps at least {self.min_kept_energy:.2%} of each module's energy"
        return text


def load_inputs(inputs: list[MergeInput]):
    """Load every input (header first) and check they can be blended; returns (files, family)."""
    from studio.adapters import load_adapter
    from studio.models.family import base_family

    if not inputs:
        raise StudioError("No adapters to merge.", "Add at least one adapter with a weight.")
    files = []
    for inp in inputs:
        f = load_adapter(inp.path)
        if f.embedding is not None:
            raise StudioError(f"{inp.path.name} is a textual-inversion embedding, not a LoRA.",
                              "Merge LoRA / LyCORIS files only.")
        if not f.modules:
            raise StudioError(f"{inp.path.name} has no adapter modules the studio can read.",
                              "Open it in the Inspect tab to see what it holds.")
        files.append(f)
    known = [(inp, base_family(f.family)) for inp, f in zip(inputs, files) if f.family]
    if not known:
        raise StudioError("None of the inputs says which model family it is for.",
                          "Check the files in the Inspect tab.")
    first_inp, family = known[0]
    for inp, fam in known[1:]:
        if fam != family:
            raise StudioError(f"{first_inp.path.name} is a {family} adapter but {inp.path.name} is {fam}: "
                              "adapters of different model families cannot be merged.",
                              "Merge only adapters made for the same base model family.")
    return files, family


def input_terms(files, inputs: list[MergeInput]) -> dict[str, list[Term]]:
    """Module name -> the non-zero weighted terms of every input that has it."""
    out: dict[str, list[Term]] = {}
    for f, inp in zip(files, inputs):
        for name, module in f.modules.items():
            coef = inp.weight * block_weight(name, inp.blocks)
            if coef == 0.0:
                continue
            out.setdefault(name, []).append(module_term(module, coef, inp.path.name))
    return out


def blend_modules(files, inputs: list[MergeInput], method: str = "concat", rank: int | None = None,
                  energy: float | None = None, family: str = "", progress=None):
    """Blend loaded adapter files into webUI modules ``{name: {suffix: tensor}}`` (float32) + a report."""
    if method not in METHODS:
        raise StudioError(f"Unknown merge method {method!r}.", f"Use one of: {', '.join(METHODS)}.")
    if method == "svd" and rank is None and energy is None:
        raise StudioError("An SVD merge needs a rank or an energy fraction.", "Give --rank R (or --energy 0.9).")
    if rank is not None and int(rank) < 1:
        raise StudioError(f"Rank {rank} is not a positive number.", "Use a rank of 1 or more.")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise StudioError(f"Energy fraction {energy} is not in (0, 1].", "Use e.g. 0.9 to keep 90% of the energy.")
    terms = input_terms(files, inputs)
    report = BlendReport(family)
    modules = {}
    names = sorted(terms)
    with torch.no_grad(), small_ops_threads():
        for i, name in enumerate(names):
            tensors, res = combine(terms[name], method, rank, energy, name)
            if progress:
                progress((i + 1) / max(1, len(names)), name)
            if tensors is None:
                report.skipped.append(name)
                continue
            modules[name] = tensors
            report.ranks[res.rank] += 1
            report.min_kept_energy = min(report.min_kept_energy, res.kept_energy)
    report.n_modules = len(modules)
    unify_alpha(modules)
    if not modules:
        raise StudioError("The merge is empty: every module's weights cancel out (or all weights are 0).",
                          "Check the weights.")
    return modules, report
