"""Chat engine benchmark (issue 15), in process, side by side in one run:

- ``engine``: the service's engine (KV slots in place, batched chunked prefill);
- ``legacy``: the engine as it was before (bench/legacy_engine.py);
- ``ceiling``: ``model.generate`` on a static cache at the same batch size.

    python -m bench.chat [--width 1024 --layers 8 --vocab 32000] [--clients 1,4,16]
        [--prompts 100,1000,2000] [--max-tokens 32] [--burst 8] [--burst-prompt 2000]
        [--dtype float32] [--device cpu] [--skip-legacy] [--json out.json]

A random LLaVA (Llama text model of the given width/depth/vocabulary, a small CLIP
tower); prompts of the given lengths (16 image tokens + random words); no stop token,
so every stream runs its ``max_tokens``. Decode tokens/s is measured while every stream
decodes: the tokens that arrive after the last stream's first token and up to the first
stream's last, over that window. Streams start apart (the prompts are read
``--max-prefill-tokens`` per step, the legacy engine one prompt per step), so each runs
``--max-tokens`` plus that many steps, and the window holds ``--max-tokens`` steps at
least. The ceiling: ``generate`` on N prompts at once, ``N x (--max-tokens - 1)`` tokens over
the time from its first generated token to its last (a streamer clocks each step).
Inter-token latency is the time between a stream's deltas, prompt-reading steps included. ``outside`` is the share of the engine's step time spent
outside the model's forward. ``burst``: one running stream's p99 inter-token latency
while ``--burst`` prompts of ``--burst-prompt`` tokens arrive, over its p99 without.
``--m2pt N``: also the engine with every request on one M2PT adapter of ``N`` textual
prompts (its KV prefix held once and read in place), the column ``m2pt tok/s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)
from transformers.generation.streamers import BaseStreamer

from bench.legacy_engine import LegacyBackbone, LegacyEngine
from service.backbones.llava import LlavaBackbone, PreparedPrompt
from service.chat.engine import GenerationEngine, GenRequest
from service.chat.kv_slots import bytes_per_token

IMAGE_TOKENS = 16  # 32 px images, 8 px patches
IMAGE_ID = 4


def random_llava(
    width: int, layers: int, vocab: int, context: int, device: str, dtype: torch.dtype
) -> LlavaBackbone:
    words = {"<unk>": 0, "<s>": 1, "<pad>": 3, "<image>": IMAGE_ID, "</x>": 2}
    words.update({f"w{i}": i for i in range(5, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    heads = max(1, width // 64)
    text = LlamaConfig(
        hidden_size=width,
        intermediate_size=int(width * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=context,
        eos_token_id=None,
        bos_token_id=1,
        pad_token_id=3,
    )
    config = LlavaConfig(  # type: ignore[call-arg]
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval().to(device, dtype)
    model.generation_config.eos_token_id = None
    processor = SimpleNamespace(tokenizer=tokenizer)
    return LlavaBackbone("random-llava", model, processor, torch.device(device), dtype)


def prompt(length: int, seed: int, vocab: int) -> PreparedPrompt:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(5, vocab, (length - 1 - IMAGE_TOKENS,), generator=g)
    ids = torch.cat([torch.tensor([1]), torch.full((IMAGE_TOKENS,), IMAGE_ID), words])[None]
    return PreparedPrompt(ids, torch.randn(1, 3, 32, 32, generator=g))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def stream(request: GenRequest, times: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while True:
        event = await request.events.get()
        if isinstance(event, BaseException):
            raise event
        times.append(loop.time())
        if event.finish_reason is not None:
            return


def summary(all_times: list[list[float]]) -> dict[str, float]:
    start = max(t[0] for t in all_times)  # every stream has its first token
    end = min(t[-1] for t in all_times)  # and none has finished
    tokens = sum(start < x <= end for t in all_times for x in t)
    gaps = [b - a for t in all_times for a, b in zip(t, t[1:], strict=False)]
    return {
        "tok_s": tokens / (end - start) if end > start else float("nan"),
        "itl_p50_ms": 1000 * pct(gaps, 0.5),
        "itl_p99_ms": 1000 * pct(gaps, 0.99),
    }


class Timed:
    """Sums the wall time of a callable (the engine's step, the model's forward)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.calls: list[float] = []  # each call's seconds

    @property
    def total(self) -> float:
        return sum(self.calls)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.calls.append(time.perf_counter() - start)


def make_engine(kind: str, llava: LlavaBackbone, clients: int, context: int, prefill: int) -> Any:
    executor = ThreadPoolExecutor(1)
    if kind == "legacy":
        return LegacyEngine(LegacyBackbone(llava), executor=executor, max_batch_size=clients, max_queue=1024)
    budget = clients * context * bytes_per_token(llava.model.config.text_config, llava.dtype)
    return GenerationEngine(
        llava,
        executor=executor,
        max_batch_size=clients,
        max_queue=1024,
        kv_cache_bytes=budget,
        max_prefill_tokens=prefill,
    )


def m2pt_adapter(llava: LlavaBackbone, n_text: int) -> Any:
    """A random M2PT adapter placed as the registry places one (device tensors and KV prefix)."""
    from fixtures.adapters import random_m2pt
    from service.registry.placement import m2pt_placement

    folded, _, extras = m2pt_placement(llava).place(random_m2pt(llava.model.config, 0, n_text=n_text))
    return SimpleNamespace(folded=folded, extras=extras)


async def run_engine(
    engine: Any, prompts: list[PreparedPrompt], max_tokens: int, adapter: Any = None
) -> list[list[float]]:
    engine.start()
    requests = [GenRequest(prompt=p, max_tokens=max_tokens, adapter=adapter) for p in prompts]
    times: list[list[float]] = [[] for _ in requests]
    for r in requests:
        engine.submit(r)
    await asyncio.gather(*(stream(r, t) for r, t in zip(requests, times, strict=True)))
    await engine.stop()
    return times


def stream_tokens(clients: int, length: int, args: argparse.Namespace) -> int:
    """``--max-tokens`` plus the steps over which the streams start (see the module docstring)."""
    return args.max_tokens + max(math.ceil(clients * length / args.max_prefill_tokens), clients)


def engine_row(
    kind: str, llava: LlavaBackbone, clients: int, length: int, args: argparse.Namespace, adapter: Any = None
) -> dict:
    engine = make_engine(kind, llava, clients, args.context, args.max_prefill_tokens)
    forward = step = None
    if kind == "engine":
        forward = Timed(llava.forward)
        llava.forward = forward  # type: ignore[method-assign]
        step = Timed(engine._step)
        engine._step = step
    prompts = [prompt(length, seed, args.vocab) for seed in range(clients)]
    try:
        times = asyncio.run(run_engine(engine, prompts, stream_tokens(clients, length, args), adapter))
    finally:
        if forward is not None:
            del llava.forward  # back to the class's method
    row = summary(times)
    if forward is not None and step is not None:
        row["outside"] = 1 - forward.total / step.total
    return row


class Clock(BaseStreamer):
    """generate hands a streamer the prompt, then each step's tokens: the time of each."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate_times(llava: LlavaBackbone, prompts: list[PreparedPrompt], n: int) -> list[float]:
    """``generate`` on the prompts together, static cache: the time of each generated token."""
    ids = torch.cat([p.input_ids for p in prompts]).to(llava.device)
    pixels = torch.cat([p.pixel_values for p in prompts]).to(llava.device, llava.dtype)  # type: ignore[misc]
    clock = Clock()
    llava.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        cache_implementation="static",
        streamer=clock,
    )
    return clock.times[1:]  # after the prompt


def ceiling_row(llava: LlavaBackbone, clients: int, length: int, args: argparse.Namespace) -> dict:
    prompts = [prompt(length, seed, args.vocab) for seed in range(clients)]
    generate_times(llava, prompts, 2)  # warm-up: the static cache's first allocation
    times = generate_times(llava, prompts, args.max_tokens)
    decode = times[-1] - times[0]  # max_tokens - 1 decode steps after the first token
    return {"tok_s": clients * (args.max_tokens - 1) / decode}


async def burst_p99(engine: Any, args: argparse.Namespace, burst: int) -> float:
    """p99 inter-token latency of one running stream, with ``burst`` long prompts arriving."""
    engine.start()
    running = GenRequest(prompt=prompt(100, 99, args.vocab), max_tokens=args.burst_stream_tokens)
    times: list[float] = []
    engine.submit(running)
    task = asyncio.ensure_future(stream(running, times))
    while len(times) < 3:
        await asyncio.sleep(0.001)
    start = len(times)
    arrivals = [
        GenRequest(prompt=prompt(args.burst_prompt, s, args.vocab), max_tokens=2) for s in range(burst)
    ]
    for r in arrivals:
        engine.submit(r)
    await asyncio.gather(task, *(stream(r, []) for r in arrivals))
    await engine.stop()
    gaps = [b - a for a, b in zip(times[start - 1 :], times[start:], strict=False)]
    return 1000 * pct(gaps, 0.99)


def burst_row(kind: str, llava: LlavaBackbone, args: argparse.Namespace) -> dict:
    quiet = asyncio.run(
        burst_p99(make_engine(kind, llava, 1 + args.burst, args.context, args.max_prefill_tokens), args, 0)
    )
    loud = asyncio.run(
        burst_p99(
            make_engine(kind, llava, 1 + args.burst, args.context, args.max_prefill_tokens), args, args.burst
        )
    )
    return {"quiet_p99_ms": quiet, "burst_p99_ms": loud, "ratio": loud / quiet}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--prompts", default="100,1000,2000")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-prefill-tokens", type=int, default=512)
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--burst-prompt", type=int, default=2000)
    parser.add_argument("--burst-stream-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--skip-legacy", action="store_true")
    parser.add_argument("--skip-ceiling", action="store_true")
    parser.add_argument("--m2pt", type=int, default=0, help="also the engine on an M2PT adapter of N prompts")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    lengths = [int(p) for p in args.prompts.split(",")]
    longest = max(stream_tokens(max(clients), n, args) for n in lengths)
    args.context = max([*lengths, args.burst_prompt]) + longest + args.burst_stream_tokens + 8
    llava = random_llava(
        args.width, args.layers, args.vocab, args.context, args.device, getattr(torch, args.dtype)
    )
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"# width {args.width}, layers {args.layers}, vocab {args.vocab}, {args.dtype} on {args.device}")
    kinds = ["engine"] + ([] if args.skip_legacy else ["legacy"])
    adapter = m2pt_adapter(llava, args.m2pt) if args.m2pt else None
    engine_row("engine", llava, 1, min(lengths), args)  # warm-up, not reported
    rows: list[dict] = []
    header = "| clients | prompt | engine tok/s | ITL p50/p99 ms | outside fwd | legacy tok/s | legacy ITL p50/p99 | ceiling tok/s | engine/legacy | engine/ceiling |"
    if adapter is not None:
        header += f" m2pt ({args.m2pt} prompts) tok/s | m2pt/engine |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for length in lengths:
        for n in clients:
            row: dict[str, Any] = {"clients": n, "prompt": length}
            for kind in kinds:
                row[kind] = engine_row(kind, llava, n, length, args)
            if not args.skip_ceiling:
                row["ceiling"] = ceiling_row(llava, n, length, args)
            if adapter is not None:
                row["m2pt"] = engine_row("engine", llava, n, length, args, adapter)
            rows.append(row)
            e, leg, ceil = row["engine"], row.get("legacy", {}), row.get("ceiling", {})
            nan = float("nan")
            print(
                f"| {n} | {length} | {e['tok_s']:.1f} | {e['itl_p50_ms']:.0f}/{e['itl_p99_ms']:.0f} | "
                f"{100 * e['outside']:.1f}% | {leg.get('tok_s', nan):.1f} | "
                f"{leg.get('itl_p50_ms', nan):.0f}/{leg.get('itl_p99_ms', nan):.0f} | {ceil.get('tok_s', nan):.1f} | "
                f"{e['tok_s'] / leg.get('tok_s', nan):.2f}x | {e['tok_s'] / ceil.get('tok_s', nan):.2f}x |"
                + (
                    ""
                    if adapter is None
                    else f" {row['m2pt']['tok_s']:.1f} | {row['m2pt']['tok_s'] / e['tok_s']:.2f}x |"
                ),
                flush=True,
            )
    if args.burst:
        print(
            f"\n| burst ({args.burst} x {args.burst_prompt} tokens) | quiet p99 ms | burst p99 ms | ratio |"
        )
        print("|---|---|---|---|")
        for kind in kinds:
            b = burst_row(kind, llava, args)
            rows.append({"burst": kind, **b})
            print(
                f"| {kind} | {b['quiet_p99_ms']:.0f} | {b['burst_p99_ms']:.0f} | {b['ratio']:.2f}x |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
