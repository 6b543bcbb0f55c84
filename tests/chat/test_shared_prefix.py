"""M2PT prefixes held once by the adapter and read in place (issue 15, item 4).

The attention over ``prefix + own tokens`` (``service.chat.prefix_attention``) against
SDPA over the two concatenated, with grouped heads, for decode and prefill shapes; then
through the service: a slot with room for a request's own tokens only serves an adapter
whose prefix is longer than the room left, exactly, and a long adapter prompt read in
chunks next to other adapters' and plain rows equals the explicit insertion."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention

from service.chat.kv_slots import bytes_per_token
from service.chat.prefix_attention import PrefixGroup, PrefixReads, prefix_sdpa_attention
from tests.chat.test_chat_adapters import AUTH, TOKEN, m2pt_bytes, m2pt_folded
from tests.chat.test_chat_exact import LONG, MEDIUM, b64, expected_text, native
from tests.conftest import running_app


class Layer(torch.nn.Module):
    """What the attention function reads off a transformers attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.layer_idx, self.num_key_value_groups, self.is_causal = 0, groups, True


def reference(q, k, v, mask):
    """SDPA with the keys repeated per query head (GQA written out)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("queries", [1, 7])  # a decode step, a prefill chunk
def test_prefix_attention_equals_attention_over_the_concatenation(queries):
    torch.manual_seed(0)
    rows, heads, kv_heads, own, d = 4, 8, 2, 11, 16
    q = torch.randn(rows, heads, queries, d)
    k, v = torch.randn(rows, kv_heads, own, d), torch.randn(rows, kv_heads, own, d)
    lengths = torch.tensor([11, 6, 9, 3])  # each row's own tokens; the rest of its slot is stale
    seen = torch.arange(own)[None, None, None, :] < lengths[:, None, None, None]
    causal = torch.arange(own) <= (own - queries + torch.arange(queries))[:, None]  # (T, K)
    mask = seen & (causal[None, None] | (queries == 1))
    prefixes = {n: [(torch.randn(1, kv_heads, n, d), torch.randn(1, kv_heads, n, d))] for n in (3, 5)}
    reads = PrefixReads(
        [PrefixGroup(torch.tensor([0, 2]), prefixes[3]), PrefixGroup(torch.tensor([3]), prefixes[5])]
    )
    out, _ = prefix_sdpa_attention(Layer(heads // kv_heads), q, k, v, mask, prefix_reads=reads)
    plain, _ = prefix_sdpa_attention(Layer(heads // kv_heads), q, k, v, mask)
    assert torch.equal(out[1], plain[1]), "a row without a prefix must keep SDPA's output bit for bit"
    for group in reads.groups:
        pk, pv = group.prefix[0]
        for row in group.rows.tolist():
            n = pk.shape[2]
            both_mask = torch.cat(
                [torch.ones(1, 1, queries, n, dtype=torch.bool), mask[row : row + 1]], dim=-1
            )
            expected = reference(
                q[row : row + 1],
                torch.cat([pk, k[row : row + 1]], 2),
                torch.cat([pv, v[row : row + 1]], 2),
                both_mask,
            )
            torch.testing.assert_close(out[row : row + 1], expected, rtol=1e-5, atol=1e-6)
            assert (out[row] - plain[row]).abs().max() > 1e-2, "the prefix must change the row"


async def upload(client, llava_dir, adapters) -> None:
    for name, seed, n_text in adapters:
        up = await client.post(
            "/v1/admin/adapters",
            files={"file": ("a", m2pt_bytes(llava_dir, name, seed, n_text))},
            headers=AUTH,
        )
        assert up.status_code == 201, up.text


async def ask(client, seed: int, instruction: str, max_tokens: int, adapter: str | None):
    body = {"image": b64(seed), "instruction": instruction, "max_tokens": max_tokens}
    if adapter is not None:
        body["adapter"] = adapter
    r = await client.post("/v1/chat", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_a_slot_holds_the_requests_own_tokens_and_the_prefix_stays_with_the_adapter(
    make_settings, position_llava_dir, explicit_tokens
):
    from transformers import LlavaConfig

    n_text, max_tokens = 12, 6
    per_token = bytes_per_token(LlavaConfig.from_pretrained(position_llava_dir).text_config, torch.float32)
    probe = make_settings(llava_model=str(position_llava_dir))
    async with running_app(probe) as (client, _):
        prompt = (await ask(client, 0, MEDIUM, 1, None))["usage"]["prompt_tokens"]
    # one slot with room for the prompt and the answer, and not for the 12 prompt tokens on top
    settings = make_settings(
        llava_model=str(position_llava_dir),
        admin_token=TOKEN,
        kv_cache_bytes=(prompt + max_tokens) * per_token,
    )
    async with running_app(settings) as (client, app):
        engine = app.state.runtime.services.chat.engine
        assert engine.kv.slots == 1 and engine.kv.slot_tokens == prompt + max_tokens
        await upload(client, position_llava_dir, [("long", 3, n_text)])
        body = await ask(client, 0, MEDIUM, max_tokens, "long")
        expected = explicit_tokens(0, MEDIUM, m2pt_folded(position_llava_dir, 3, n_text), max_tokens)
        assert body["text"] == expected_text(app, expected)
        assert body["text"] != (await ask(client, 0, MEDIUM, max_tokens, None))["text"]
        loaded = app.state.runtime.services.registry._loaded["long@1"]
        prefix = loaded.extras["prefix"]
        assert prefix[0][0].shape[2] == n_text
        assert loaded.nbytes >= n_text * per_token  # the prefix counts in the adapter's device bytes
        assert engine.kv.free == 1


async def test_adapter_prompts_read_in_chunks_next_to_other_rows_equal_the_explicit_insertion(
    make_settings, position_llava_dir, explicit_tokens, generate_tokens
):
    settings = make_settings(llava_model=str(position_llava_dir), admin_token=TOKEN, max_prefill_tokens=24)
    async with running_app(settings) as (client, app):
        await upload(client, position_llava_dir, [("caption", 1, 3), ("vqa", 2, 5)])
        engine = app.state.runtime.services.chat.engine
        plan = [(0, LONG, 7, "caption"), (1, MEDIUM, 9, "vqa"), (2, LONG, 5, None), (3, LONG, 6, "vqa")]
        running = asyncio.ensure_future(ask(client, 4, MEDIUM, 30, "caption"))
        while not engine.batch_rows:  # one adapter row is decoding before the others arrive
            await asyncio.sleep(0)
        engine.step_shapes.clear()
        bodies = await asyncio.gather(*(ask(client, *p) for p in plan))
        shapes = list(engine.step_shapes)
        folded = {
            "caption": m2pt_folded(position_llava_dir, 1, 3),
            "vqa": m2pt_folded(position_llava_dir, 2, 5),
        }
        for (seed, instruction, max_tokens, adapter), body in zip(plan, bodies, strict=True):
            if adapter is None:
                expected = generate_tokens(seed, instruction, max_tokens)
            else:
                expected = explicit_tokens(seed, instruction, folded[adapter], max_tokens)
            assert body["text"] == expected_text(app, expected), (seed, adapter)
        first = await running
        assert first["text"] == expected_text(app, explicit_tokens(4, MEDIUM, folded["caption"], 30))
        assert any(decoded and read for decoded, read, _ in shapes), "no step read prompts while rows decoded"
        assert all(tokens <= 24 for _, _, tokens in shapes)
        assert max(tokens for _, _, tokens in shapes) == 24, "no prompt was split over steps"
        assert (await native(client, 2, LONG, 5))["text"] == bodies[2]["text"]
