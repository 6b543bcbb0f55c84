"""The ranked list of proposed service changes, with this run's figures as evidence."""

from __future__ import annotations

import math

from .report import Run, ceiling_row, find
from .servers import LOG_DIR


def _count_in_logs(needle: str, pattern: str = "promptswap-*churn.log") -> int:
    return sum(p.read_text(errors="replace").count(needle) for p in LOG_DIR.glob(pattern))


def _per_image_model_s(run: Run, group: str, scenario: str) -> float:
    row = find(run.rows, group, scenario, "promptswap")
    if row is None or "model s/batch" not in row.notes:
        return math.nan
    return row.notes["model s/batch"] / max(row.notes["mean batch"], 1e-9)


def proposals(run: Run) -> list[str]:
    g = "B/32 float32"
    st = run.stages or {}
    ceil = ceiling_row(run.rows, g)
    ceil_s = 1 / ceil.rps if ceil and ceil.rps else math.nan
    svc_s = _per_image_model_s(run, g, "zero-shot, 10 labels")
    churn = find(run.rows, g, "churn", "promptswap")
    first = find(run.rows, g, "first use each", "promptswap")
    key_errors = _count_in_logs("KeyError")
    out = []
    out.append(
        "1. **Fix a race in `service/registry.py` `AdapterRegistry.acquire` (correctness).** After "
        "`await self._load_once(stored)` the freshly loaded version is unpinned until the waiter resumes; "
        "another load finishing first runs `_evict_over_budget` and evicts it, and "
        "`self._loaded.move_to_end(adapter.key)` raises `KeyError` -> HTTP 500 (and dropped connections). "
        f"Evidence: churn row ({churn.failed if churn else '?'} failed of {churn.n if churn else '?'}: "
        f"{churn.notes.get('failures', {}) if churn else ''}); `KeyError` appears {key_errors} times in "
        "`bench/out/logs/*churn.log`. Change: pin in the same step the load completes, or in `acquire` "
        "replace `move_to_end` with `if adapter.key in self._loaded: self._loaded.move_to_end(adapter.key)` "
        "(the request holds the object; the tensors stay alive) and add a test with a 1-adapter budget and "
        "two concurrent cold acquires. Gain: zero failures under churn."
    )
    out.append(
        '2. **Fix `--dtype` in `service/cli.py` `_option_type`.** `"float" in str(annotation)` matches '
        "`Literal['auto', 'float32', 'bfloat16', 'float16']`, so `promptswap serve --dtype float32` fails "
        'with "invalid float value" (the bench passes `PROMPTSWAP_DTYPE` instead). Change: return `str` '
        "when `typing.get_origin(annotation) is Literal`, before the int/float guesses; test "
        "`--dtype bfloat16`."
    )
    one_t = st.get("image encoder ms/image @ batch 16, 1 thread") or st.get(
        "service image_features ms/image @ batch 16, 1 thread"
    )
    two_t = st.get("service image_features ms/image @ batch 16")
    out.append(
        "3. **Give the model thread the cores, and say how many (`service/runtime.py`, `service/settings.py`).** "
        "The model thread runs torch with every core as intra-op threads while the decode pool "
        "(`--decode-threads` = min(4, cores)), the event loop and the client share the same cores; OpenMP "
        "teams stall whenever one of their threads is preempted. Evidence: model time per image inside the "
        f"service {svc_s * 1000:.0f} ms (`promptswap_inference_seconds` / mean batch, zero-shot) against "
        f"{ceil_s * 1000:.0f} ms/image for the same forward alone (ceiling); in-process at batch 16: "
        f"{_v(two_t)} ms/image with 2 threads, {_v(one_t)} ms/image with 1. Change: a `torch_threads` setting "
        "applied with `torch.set_num_threads` inside the model thread at load, defaulting to cores minus "
        "one on small CPUs, and `decode_threads` defaulting to 1 when cores <= 2. Gain: closes part of the "
        "service/ceiling gap on CPU; measure with this bench."
    )
    out.append(
        "4. **One text forward for all adapters of a batch (`service/classify.py` `_compute_text`).** Missing "
        "text embeddings are computed with one forward per adapter (`by_adapter` loop); `encode_text` already "
        "takes per-row prompts, so stack the rows of every adapter with the same prompt shape into one "
        f"chunked forward. Evidence: 10 labels of one adapter take {_v(st.get('text encoder + MaPLe prompts ms for 10 labels'))} ms; "
        f"160 prompts (16 adapters) in one forward take {_v(st.get('text encoder ms for 160 prompts in one forward'))} ms "
        f"against 16 x that; the first-use scenario runs at {first.rps if first else math.nan:.2f} req/s "
        "with p50 " + (f"{first.p50_ms / 1000:.1f} s" if first else "?") + ". Gain: cold batches "
        "several times faster; also compute cold text in its own step so warm rows of the same batch are "
        "not held behind it (a cold batch here outlived the 30 s default deadline in an earlier run on a "
        "loaded machine: every row got 504)."
    )
    out.append(
        "5. **Preprocess without the generic image processor (`service/backbones/clip.py` `preprocess`).** "
        f"`CLIPImageProcessorPil` costs {_v(st.get('HF image processor ms'))} ms per 640x480 photo; the same "
        "recipe written directly (PIL bicubic resize of the short side with transformers' `int()` rounding, "
        f"centre crop, one numpy normalise) costs {_v(st.get('direct resize+crop+normalise ms'))} ms and gives "
        f"identical tensors (max abs diff {_v(st.get('direct vs HF max abs diff'), 4)}; `bench/profile.py` "
        "`fast_preprocess`). Use it when the checkpoint's processor is a CLIP one with the default settings "
        "(check `do_resize`, `size`, `crop_size`, `resample`, mean/std at load), fall back otherwise; keep "
        "the exactness tests. Gain: small on this CPU (the model dominates), large on a GPU where the image "
        "forward is ~1 ms/image and decode + preprocess is the bottleneck (DESIGN note 8)."
    )
    out.append(
        f"6. **Opt-in DCT-scaled JPEG decode (`service/images.py`).** Full decode {_v(st.get('jpeg decode 640x480 ms'))} ms "
        f"vs `Image.draft` {_v(st.get('draft decode ms'))} ms at 640x480; the gain grows with photo size "
        "(phone photos are 12 MP). Changes pixels: opt-in setting only, with its logit shift measured."
    )
    hf = st.get("HF get_image_features ms/image @ batch 16")
    sv = st.get("service image_features ms/image @ batch 16")
    pr = st.get("service image_features + MaPLe prompts ms/image @ batch 16")
    out.append(
        f"7. No change needed in the prompted forward: in-process at batch 16, transformers' "
        f"`get_image_features` {_v(hf)} ms/image, the service's `encode_image` {_v(sv)} ms/image, with "
        f"MaPLe prompts (n_ctx 2, depth 9) {_v(pr)} ms/image; adapters cost little beyond the two extra tokens."
    )
    return out


def _v(x: float | None, digits: int = 1) -> str:
    return "?" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"
