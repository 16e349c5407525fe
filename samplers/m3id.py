"""M3ID decoding (Multi-Modal Mutual-Information Decoding, arXiv 2403.14003).

Vision-language models drift towards their language prior as a caption grows: the image's
share in each next-token distribution fades. M3ID contrasts, per generated token t, the
log-probabilities with the image (l_c) and without it (l_u, same prompt and same generated
prefix, its own KV cache) and amplifies what the image adds, more as t grows:

    gamma_t = exp(-lambda * t)            (t = 1 for the first generated token)
    w_t     = min((1 - gamma_t) / gamma_t, weight_cap)
    l       = l_c + [max p_c < alpha] * w_t * (l_c - l_u)

The gate leaves tokens alone where the conditioned model is already confident (top-1
probability >= alpha). lambda = 0 gives w_t = 0, i.e. exactly plain decoding. The cap
keeps very long captions from being dominated by the contrast term. The Prompt Dependency
Measure (PDM) of a token is the Hellinger distance between p_c and p_u: how much the image
changed the distribution (0: not at all, 1: disjoint).

The conditioned branch runs inside ``model.generate`` (which knows each family's vision
inputs, position ids and cache). The image-free branch has two implementations:

* fused (default): its rows are appended to the conditioned batch, left-padded to the
  same length with the attention mask covering the padding, so one forward per token
  serves both branches (each row still has its own KV cache rows). ``generate`` derives
  position ids from the mask, so the padding does not shift positions.
* separate: :class:`ImageFreeBranch` inside :class:`M3IDProcessor` runs its own forward
  and KV cache per step (used to check the fused mode, and where a model cannot take
  mixed image / no-image rows in one batch).
The processor also makes the token choice (greedy, or sampling from its own seeded
``torch.Generator``) and hands ``generate`` a one-hot score row, so ``generate`` runs
greedily and the global RNG is never touched.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Progress = Callable[[int, int], None] | None
TOKEN_TYPE_KEYS = ("token_type_ids", "mm_token_type_ids")  # per-token inputs that continue into generated tokens


@dataclass
class M3IDSettings:
    """User-facing knobs; defaults follow the project's design (lambda 0.02, alpha 0.3, greedy)."""

    lam: float = 0.02
    alpha: float = 0.3
    weight_cap: float = 10.0
    max_new_tokens: int = 64
    greedy: bool = True
    seed: int = 0
    temperature: float = 1.0
    contrast: bool = True  # False: plain decoding (the image-free branch then runs only for PDM)
    pdm: bool = True  # run the image-free branch to report PDM even when contrast is off

    def validate(self) -> None:
        if not math.isfinite(self.lam) or self.lam < 0:
            raise ValueError(f"lambda must be >= 0 (got {self.lam}); 0 is plain decoding.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (got {self.alpha}).")
        if self.weight_cap < 0:
            raise ValueError(f"weight_cap must be >= 0 (got {self.weight_cap}).")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens}).")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (got {self.temperature}).")


def m3id_weight(t: int, lam: float, cap: float) -> float:
    """w_t = (1 - gamma_t) / gamma_t with gamma_t = exp(-lambda t), capped (= expm1(lambda t))."""
    return float(min(math.expm1(lam * t), cap))


def m3id_combine(l_c: torch.Tensor, l_u: torch.Tensor, t: int, lam: float, alpha: float,
                 cap: float) -> torch.Tensor:
    """The M3ID rule on log-probabilities of shape (batch, vocab); returns the combined scores."""
    w = m3id_weight(t, lam, cap)
    if w == 0.0:
        return l_c
    gate = (l_c.max(dim=-1, keepdim=True).values.exp() < alpha).to(l_c.dtype)
    return l_c + gate * w * (l_c - l_u)


def hellinger(l_c: torch.Tensor, l_u: torch.Tensor) -> torch.Tensor:
    """Hellinger distance between the distributions of two log-prob rows: sqrt(1 - BC), in [0, 1]."""
    bc = torch.exp(0.5 * (l_c + l_u)).sum(dim=-1)
    return torch.sqrt(torch.clamp(1.0 - bc, min=0.0))


class ImageFreeBranch:
    """The image-free branch: same prompt without the image, its own KV cache, text-only forward.

    Position ids are passed explicitly so that families that keep decoding state on the
    model (Qwen2-VL's ``rope_deltas``) are not disturbed by this second sequence.
    """

    def __init__(self, model: Any, inputs: dict[str, torch.Tensor], generated_type: int = 0):
        self.model = model
        self.inputs = inputs
        self.generated_type = generated_type  # token type of generated tokens (PaliGemma: 1, the suffix)
        # transformers 5 renames forward's ``past_key_values`` to ``cache`` (the old name goes in 5.40)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.cache: Any = None
        self.length = 0
        self.logits_trace: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, new_tokens: torch.Tensor | None) -> torch.Tensor:
        """Feed the prompt (first call) or the last chosen tokens; return last-position logits."""
        if self.cache is None:
            ids = self.inputs["input_ids"]
            extra = {k: v for k, v in self.inputs.items() if k != "input_ids"}
        else:
            ids = new_tokens.reshape(-1, 1)
            extra = {k: torch.full_like(ids, self.generated_type) for k in self.inputs if k in TOKEN_TYPE_KEYS}
        device = self.model.device
        ids = ids.to(device)
        pos = torch.arange(self.length, self.length + ids.shape[1], device=device).expand(ids.shape[0], -1)
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{self.cache_arg: self.cache}, **{k: v.to(device) for k, v in extra.items()})
        self.cache = out["cache"] if "cache" in out else out.past_key_values
        self.length += ids.shape[1]
        logits = out.logits[:, -1, :].float()
        self.logits_trace.append(logits)
        return logits


class M3IDProcessor:
    """A transformers ``LogitsProcessor`` applying M3ID and choosing the token itself.

    Records, per step, the PDM of each row and whether the gate fired, for the caption report.
    """

    def __init__(self, model: Any, uncond_inputs: dict[str, torch.Tensor] | None, settings: M3IDSettings,
                 fused_rows: int = 0, generated_type: int = 0):
        self.settings = settings
        self.fused_rows = fused_rows  # > 0: the last ``fused_rows`` rows of the batch are the image-free branch
        self.branch = ImageFreeBranch(model, uncond_inputs, generated_type) if uncond_inputs is not None and not fused_rows else None
        self.t = 0
        self.pdm: list[torch.Tensor] = []
        self.gated: list[torch.Tensor] = []
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        s = self.settings
        self.t += 1
        n = self.fused_rows
        cond_scores = scores[:-n] if n else scores
        l_c = torch.log_softmax(cond_scores.float(), dim=-1)
        l_u = None
        if n:
            l_u = torch.log_softmax(scores[-n:].float(), dim=-1)
        elif self.branch is not None:
            u = self.branch.step(None if self.t == 1 else input_ids[:, -1])
            l_u = torch.log_softmax(u.to(l_c.device)[:, : l_c.shape[-1]], dim=-1)
            if u.shape[-1] < l_c.shape[-1]:  # vocab padding on the conditioned head only
                l_u = torch.nn.functional.pad(l_u, (0, l_c.shape[-1] - u.shape[-1]), value=-math.inf)
        if l_u is not None:
            self.pdm.append(hellinger(l_c, l_u).cpu())
            self.gated.append((l_c.max(dim=-1).values.exp() < s.alpha).cpu())
            combined = m3id_combine(l_c, l_u, self.t, s.lam, s.alpha, s.weight_cap) if s.contrast else l_c
        else:
            combined = l_c
        if s.greedy:
            choice = combined.argmax(dim=-1)
        else:
            if self.generator is None:
                self.generator = torch.Generator(device=combined.device).manual_seed(int(s.seed))
            probs = torch.softmax(combined / s.temperature, dim=-1)
            choice = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
        if n:
            choice = torch.cat([choice, choice])  # the image-free rows follow the chosen tokens
        out = torch.full_like(scores, -math.inf)
        out.scatter_(1, choice[:, None], 0.0)
        return out


class _ProgressCriteria:
    """A StoppingCriteria that never stops but reports each token step (and lets Cancel raise)."""

    def __init__(self, progress: Progress, total: int, offset: int = 0, grand_total: int | None = None,
                 rows: int = 1):
        self.progress, self.total, self.offset = progress, total, offset
        self.grand_total = grand_total or total
        self.rows = rows  # captions decoded together: each step is one token of each
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> torch.BoolTensor:
        self.step += 1
        if self.progress is not None:
            self.progress(min(self.offset + self.step * self.rows, self.grand_total), self.grand_total)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class CaptionResult:
    """One caption: text, generated token ids, and per-token PDM (empty for plain decoding)."""

    text: str
    token_ids: list[int]
    pdm: list[float] = field(default_factory=list)
    gated: list[bool] = field(default_factory=list)
    error: str | None = None


def fuse_inputs(cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor],
                pad_token_id: int) -> dict[str, torch.Tensor]:
    """One batch holding both branches: conditioned rows, then image-free rows, left-padded.

    Every per-token tensor of the conditioned inputs (input_ids, attention_mask,
    token_type_ids, mm_token_type_ids, ...) gets an image-free counterpart: the image-free
    ids, a mask of ones, and the branch's own token types (zeros: no image, prompt prefix).
    Image tensors (pixel_values, image sizes/grids) stay as they are: they belong to the
    conditioned rows only.
    """
    ids_c, ids_u = cond["input_ids"], uncond["input_ids"]
    b, lc = ids_c.shape
    lu = ids_u.shape[1]
    length = max(lc, lu)

    def left_pad(x: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (length - x.shape[1], 0), value=value)

    mask_c = cond.get("attention_mask", torch.ones_like(ids_c))
    fused: dict[str, torch.Tensor] = {}
    for key, val in cond.items():
        if not torch.is_tensor(val) or val.ndim != 2 or tuple(val.shape) != (b, lc):
            fused[key] = val
            continue
        if key == "input_ids":
            u, pad = ids_u, pad_token_id
        elif key == "attention_mask":
            u, pad = torch.ones_like(ids_u), 0
        else:
            u, pad = uncond.get(key, torch.zeros_like(ids_u)).to(val.dtype), 0
        fused[key] = torch.cat([left_pad(val, pad), left_pad(u, pad)])
    if "attention_mask" not in cond:
        fused["attention_mask"] = torch.cat([left_pad(mask_c, 0), left_pad(torch.ones_like(ids_u), 0)])
    return fused


@torch.no_grad()
def generate_m3id(model: Any, cond_inputs: dict[str, torch.Tensor], uncond_inputs: dict[str, torch.Tensor] | None,
                  settings: M3IDSettings, eos_token_ids: list[int], pad_token_id: int,
                  progress: Progress = None, progress_offset: int = 0,
                  progress_total: int | None = None, fused: bool = True,
                  generated_type: int = 0) -> tuple[torch.Tensor, M3IDProcessor]:
    """Run M3ID for a batch; returns (new token ids (batch, <= max_new_tokens), the processor).

    ``uncond_inputs=None`` skips the image-free branch: plain greedy/sampled decoding
    through the same code path. ``fused`` runs both branches in one batch (see module doc).
    ``generated_type`` is the token type the separate image-free branch gives generated tokens.
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    settings.validate()
    batch = cond_inputs["input_ids"].shape[0]
    fused = fused and uncond_inputs is not None
    if fused:
        cond_inputs = fuse_inputs(cond_inputs, uncond_inputs, pad_token_id)
    proc = M3IDProcessor(model, uncond_inputs, settings, fused_rows=batch if fused else 0,
                         generated_type=generated_type)
    gen_cfg = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
                               eos_token_id=eos_token_ids or None, pad_token_id=pad_token_id,
                               repetition_penalty=1.0, no_repeat_ngram_size=0)
    device = model.device
    inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in cond_inputs.items()}
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    stop = _ProgressCriteria(progress, settings.max_new_tokens, progress_offset, progress_total, rows=batch)
    out = model.generate(**inputs, generation_config=gen_cfg, logits_processor=LogitsProcessorList([proc]),
                         stopping_criteria=StoppingCriteriaList([stop]))
    return out[:batch, inputs["input_ids"].shape[1]:], proc


def split_results(new_tokens: torch.Tensor, proc: M3IDProcessor, tokenizer: Any,
                  eos_token_ids: list[int]) -> list[CaptionResult]:
    """Cut each row at its first EOS and attach that row's PDM / gate trace."""
    results = []
    eos = set(eos_token_ids)
    for row in range(new_tokens.shape[0]):
        ids = new_tokens[row].tolist()
        n = next((i for i, tok in enumerate(ids) if tok in eos), len(ids))
        ids = ids[:n]
        pdm = [float(p[row]) for p in proc.pdm[:n]]
        gated = [bool(g[row]) for g in proc.gated[:n]]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        results.append(CaptionResult(text, ids, pdm, gated))
    return results
