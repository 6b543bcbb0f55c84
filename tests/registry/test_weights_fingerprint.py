"""Weights-aware fingerprints through HTTP: an adapter made for another checkpoint of the
same shapes is refused naming "weights" unless an admin forces it (recorded and listed);
adapters without a weights digest keep working, listed as shapes-only."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from adapters.format import dump, read_adapter_file
from adapters.maple import clip_fingerprint
from adapters.weights import WEIGHTS, same_weights, weights_digest, with_weights
from fixtures.adapters import adapter_bytes, random_folded
from fixtures.tiny_models import save_tiny_clip
from tests.conftest import running_app
from tests.registry.test_admin_api import TOKEN, classify, store_snapshot, upload


@pytest.fixture(scope="module")
def other_clip_dir(tmp_path_factory):
    """The same architecture and shapes as tiny_clip_dir, other weights."""
    return save_tiny_clip(tmp_path_factory.mktemp("other-clip"), seed=1)


def made_for(clip_dir, name: str, seed: int = 0, **folded) -> bytes:
    model = CLIPModel.from_pretrained(clip_dir)
    backbone = with_weights(clip_fingerprint(model.config), model)
    return dump(random_folded(model.config, seed, **folded), name=name, backbone=backbone)


def test_the_digest_names_the_checkpoint_in_any_serving_precision(tiny_clip_dir, other_clip_dir):
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    digest = weights_digest(model)
    other = weights_digest(CLIPModel.from_pretrained(other_clip_dir))
    assert clip_fingerprint(model.config) == clip_fingerprint(
        CLIPModel.from_pretrained(other_clip_dir).config
    )
    assert not same_weights(digest, other)  # same shapes, other weights: told apart
    for dtype in (torch.float16, torch.bfloat16):  # served in half precision: still the same
        assert same_weights(digest, weights_digest(CLIPModel.from_pretrained(tiny_clip_dir).to(dtype)))
    with torch.no_grad():  # one sampled value changed: another checkpoint
        weight = model.text_model.embeddings.token_embedding.weight
        weight.view(-1)[weight.numel() // 32] += 0.5
    assert not same_weights(digest, weights_digest(model))


async def test_other_weights_are_refused_unless_forced(
    make_settings, tiny_clip_dir, other_clip_dir, tmp_path
):
    async with running_app(make_settings(admin_token=TOKEN)) as (client, _):
        before = store_snapshot(tmp_path / "adapters") if (tmp_path / "adapters").exists() else {}
        foreign = made_for(other_clip_dir, "pets")
        refused = await upload(client, foreign)
        assert refused.status_code == 409, refused.text
        assert "weights" in refused.json()["error"]["message"]
        assert "force=true" in refused.json()["error"]["message"]
        assert store_snapshot(tmp_path / "adapters") == before  # nothing stored
        assert (await upload(client, foreign, force="maybe")).status_code == 422

        forced = await upload(client, foreign, force="true")
        assert forced.status_code == 201, forced.text
        backbone = forced.json()["manifest"]["backbone"]
        serving = weights_digest(CLIPModel.from_pretrained(tiny_clip_dir))
        assert backbone["weights_forced"] == serving and backbone[WEIGHTS] != serving
        assert (await classify(client, 0, ["cat", "dog"], "pets")).status_code == 200  # it serves

        mine = await upload(client, made_for(tiny_clip_dir, "pets", seed=2))
        assert mine.status_code == 201 and "weights_forced" not in mine.json()["manifest"]["backbone"]
        legacy = await upload(client, adapter_bytes(tiny_clip_dir, "pets", seed=3))  # config only
        assert legacy.status_code == 201
        versions = (await client.get("/v1/adapters/pets")).json()["versions"]
        assert [(v["fingerprint"], v["forced"]) for v in versions] == [
            ("weights (forced)", True),
            ("weights", False),
            ("shapes-only fingerprint", False),
        ]
        assert (await classify(client, 0, ["cat"], "pets@3")).status_code == 200

        # force covers weights only: another shape is refused all the same
        config = CLIPConfig.from_pretrained(tiny_clip_dir)
        deep = clip_fingerprint(config) | {"text_layers": config.text_config.num_hidden_layers + 1}
        mismatch = dump(random_folded(config, 4), name="deep", backbone=deep)
        still = await upload(client, mismatch, force="true")
        assert still.status_code == 409 and "text_layers" in still.json()["error"]["message"]


async def test_adapters_stored_before_weights_fingerprints_keep_working(
    make_settings, tiny_clip_dir, tmp_path
):
    store = tmp_path / "adapters"
    (store / "old").mkdir(parents=True)
    (store / "old" / "1.safetensors").write_bytes(adapter_bytes(tiny_clip_dir, "old", seed=5))
    async with running_app(make_settings(admin_token=TOKEN)) as (client, _):
        answer = await classify(client, 0, ["cat", "dog"], "old")
        assert answer.status_code == 200 and answer.json()["adapter"] == "old@1"
        (version,) = (await client.get("/v1/adapters/old")).json()["versions"]
        assert version["fingerprint"] == "shapes-only fingerprint"
    assert (
        WEIGHTS not in read_adapter_file(store / "old" / "1.safetensors", max_bytes=1 << 20).manifest.backbone
    )
