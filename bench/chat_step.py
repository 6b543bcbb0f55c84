"""One decode step at N rows of L tokens: the service's engine against ``generate`` on a static
cache (the ceiling), alternating in one process, several rounds (issue 15's 0.85x target).

The grid of ``bench.chat`` times whole streams once per system; at large sizes one run of each
is a few dozen steps, and this machine's step time drifts by tens of per cent between runs.
Here each round times, for the engine, every step in which all N rows decode and no prompt is
read, and for ``generate`` every step after its first token (a streamer clocks them); the
medians of each round are printed side by side.

    python -m bench.chat_step [--clients 16] [--prompt 2000] [--steps 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio

import torch

from bench import chat as bc


def engine_steps(llava, args: argparse.Namespace) -> list[float]:
    engine = bc.make_engine("engine", llava, args.clients, args.context, args.max_prefill_tokens)
    step = bc.Timed(engine._step)
    engine._step = step  # type: ignore[method-assign]
    prompts = [bc.prompt(args.prompt, seed, args.vocab) for seed in range(args.clients)]
    tokens = bc.stream_tokens(args.clients, args.prompt, args)
    asyncio.run(bc.run_engine(engine, prompts, tokens))
    shapes = list(engine.step_shapes)
    return [
        d
        for d, (decoded, read, _) in zip(step.calls, shapes, strict=True)
        if decoded == args.clients and not read
    ]


def generate_steps(llava, args: argparse.Namespace) -> list[float]:
    prompts = [bc.prompt(args.prompt, seed, args.vocab) for seed in range(args.clients)]
    times = bc.generate_times(llava, prompts, args.steps)
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--prompt", type=int, default=2000)
    p.add_argument("--steps", type=int, default=16, help="decode steps measured per round and system")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-prefill-tokens", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args()
    args.max_tokens = args.steps
    args.context = args.prompt + bc.stream_tokens(args.clients, args.prompt, args) + 8
    llava = bc.random_llava(
        args.width, args.layers, args.vocab, args.context, args.device, getattr(torch, args.dtype)
    )
    print(
        f"# {args.clients} rows x {args.prompt} tokens, width {args.width}, {args.layers} layers, {args.dtype}"
    )
    print("| round | engine step ms (median) | generate step ms (median) | engine / ceiling tok/s |")
    print("|---|---|---|---|")
    generate_steps(llava, args)  # warm-up: the static cache's first allocation
    for r in range(args.rounds):
        order = [("engine", engine_steps), ("generate", generate_steps)]
        if r % 2:
            order.reverse()
        ms = {name: 1000 * median(fn(llava, args)) for name, fn in order}
        print(
            f"| {r} | {ms['engine']:.0f} | {ms['generate']:.0f} | {ms['generate'] / ms['engine']:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
