"""An adapter that stores its labels (and template) classifies with them when the request
names none; a request's own labels and template still win."""

from __future__ import annotations

import base64
import json

from transformers import CLIPConfig

from adapters.format import dump
from adapters.maple import clip_fingerprint
from fixtures.adapters import adapter_bytes, random_folded
from tests.conftest import encode, make_image, running_app
from tests.registry.test_admin_api import TOKEN, classify, logits_of, upload

LABELS = ["zero", "one", "two", "three"]
TEMPLATE = "a handwritten digit {}."


def trained_like(clip_dir, name: str) -> bytes:
    """What ``promptswap adapters train maple`` writes: labels as a JSON list, the template."""
    config = CLIPConfig.from_pretrained(clip_dir)
    hp = {"labels": json.dumps(LABELS), "template": TEMPLATE}
    return dump(random_folded(config, 5), name=name, backbone=clip_fingerprint(config), hyperparameters=hp)


async def test_labels_and_template_come_from_the_manifest(make_settings, tiny_clip_dir):
    async with running_app(make_settings(admin_token=TOKEN)) as (client, _):
        assert (await upload(client, trained_like(tiny_clip_dir, "digits"))).status_code == 201
        assert (await upload(client, adapter_bytes(tiny_clip_dir, "plain"))).status_code == 201
        image = encode(make_image(3))
        bare = await client.post(
            "/v1/classify", files={"image": ("i.png", image)}, data={"adapter": "digits"}
        )
        assert bare.status_code == 200, bare.text
        assert sorted(row["label"] for row in bare.json()["labels"]) == sorted(LABELS)
        explicit = await client.post(
            "/v1/classify",
            files={"image": ("i.png", image)},
            data={"adapter": "digits", "labels": LABELS, "template": TEMPLATE},
        )
        assert logits_of(bare.json()) == logits_of(explicit.json())
        # the manifest's template is really used: another template changes the logits
        other = await client.post(
            "/v1/classify",
            files={"image": ("i.png", image)},
            data={"adapter": "digits", "labels": LABELS, "template": "a photo of a {}."},
        )
        assert logits_of(other.json()) != logits_of(bare.json())
        # JSON bodies too; the request's own labels win
        as_json = await client.post(
            "/v1/classify", json={"image": base64.b64encode(image).decode(), "adapter": "digits", "top_k": 2}
        )
        assert as_json.status_code == 200 and len(as_json.json()["labels"]) == 2
        own = (await classify(client, 3, ["cat", "dog"], "digits")).json()
        assert sorted(logits_of(own)) == ["cat", "dog"]

        for data, needle in (({"adapter": "plain"}, "plain@1"), ({}, "adapter that stores")):
            refused = await client.post("/v1/classify", files={"image": ("i.png", image)}, data=data)
            assert refused.status_code == 422 and needle in refused.json()["error"]["message"]
        empty = await client.post(
            "/v1/classify",
            json={"image": base64.b64encode(image).decode(), "adapter": "digits", "labels": []},
        )
        assert empty.status_code == 422  # an explicit empty list is not "no labels"
